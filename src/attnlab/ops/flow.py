"""Flowformer's flow-attention: linear attention with flow conservation (competition and allocation).

"Flowformer: Linearizing Transformers with Conservation Flows" (Wu et al., arXiv 2202.06258), eqs. 4-9
(as the authors' ``Flow_Attention`` / ``Flow_Attention_Causal`` code computes them).
The feature map ``phi = sigmoid`` is applied inside the op. Per head, ``Q' = phi(Q)``, ``K' = phi(K)``::

    I_i = 1 / ((Q'_i + eps) . (sum_j K'_j + eps))          incoming flow of sink i
    O_j = 1 / ((K'_j + eps) . (sum_i Q'_i + eps))          outgoing flow of source j
    I^_i = (Q'_i + eps) . (sum_j K'_j O_j + eps)           conserved incoming flow
    O^_j = clamp((K'_j + eps) . (sum_i Q'_i I_i + eps), -1, 1)
    out_i = sigmoid(I^_i N / M) * sum_j ((Q'_i I_i) . K'_j) (softmax_j(O^) M) v_j

The causal version replaces every sum by a prefix sum and rescales by ``nu_i = i + 1`` (see
:func:`flow_attention`).
"""

from __future__ import annotations

from typing import Literal

import torch

from attnlab.ops.lightning import scan_segments, segment_length
from attnlab.ops.linear import linear_attention_chunked
from attnlab.ops.nonfinite import guard_nonfinite
from attnlab.ops.validation import Sizes, check_causal, check_float, check_impl, check_qkv, compute_dtype, expand_kv
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["flow_attention", "flow_attention_reference"]

IMPLS = ("auto", "reference", "linear")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, eps: float) -> tuple[Sizes, float]:
    sizes = check_qkv(q, k, v)
    if causal and sizes.key_length != sizes.length:
        raise ValueError(f"causal flow attention needs keys of the query length (the paper defines it for "
                         f"self-attention), got N={sizes.length} queries and M={sizes.key_length} keys")
    return sizes, float(check_float("eps", eps, minimum=0))


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    sizes, eps = _check(q, k, v, causal=causal, eps=eps)
    dtype = compute_dtype(q.dtype)
    qp = torch.sigmoid(q.to(dtype))  # (B, H, N, D)
    kp = torch.sigmoid(expand_kv(k, sizes.heads).to(dtype))  # (B, H, M, D)
    vf = expand_kv(v, sizes.heads).to(dtype)  # (B, H, M, Dv)
    return qp, kp, vf, float(eps)


def flow_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                             eps: float = 1e-6) -> torch.Tensor:
    """The explicit ``N x M`` form ``Out = diag(alloc) ((Q' (.) I) K'^T [masked]) diag(comp) V``.

    Flowformer (arXiv 2202.06258), eqs. 4-9; every (prefix) sum is written as a product with an
    all-ones (lower-triangular when causal) matrix. Shapes as in :func:`flow_attention`.
    """
    check_causal(causal)
    qp, kp, vf, eps = _prepare(q, k, v, causal=causal, eps=eps)
    N, M = qp.shape[2], kp.shape[2]
    if causal:
        ones = torch.ones(N, M, dtype=qp.dtype, device=q.device).tril()  # sums over j <= i
        nu = torch.arange(1, N + 1, dtype=qp.dtype, device=q.device)  # (N,)
    else:
        ones = torch.ones(N, M, dtype=qp.dtype, device=q.device)
        nu = torch.ones(N, dtype=qp.dtype, device=q.device)
    key_sums = torch.einsum("nm,bhmd->bhnd", ones, kp)  # (B, H, N, D): sum_{j (<= i)} K'_j
    query_sums = torch.einsum("mn,bhnd->bhmd", ones.T if not causal else ones, qp)  # (B, H, M, D): sum_{i (<= j)} Q'_i
    incoming = nu / ((qp + eps) * (key_sums + eps)).sum(-1)  # (B, H, N)
    outgoing = nu[:M] / ((kp + eps) * (query_sums + eps)).sum(-1) if causal else \
        1.0 / ((kp + eps) * (query_sums + eps)).sum(-1)  # (B, H, M)
    conserved_sink = ((qp + eps) * (torch.einsum("nm,bhmd->bhnd", ones, kp * outgoing[..., None]) + eps)).sum(-1)
    conserved_source = ((kp + eps) * (torch.einsum("mn,bhnd->bhmd", ones.T if not causal else ones,
                                                    qp * incoming[..., None]) + eps)).sum(-1)
    if causal:
        conserved_sink = conserved_sink / nu
        conserved_source = conserved_source / nu
        allocation = torch.sigmoid(conserved_sink)  # (B, H, N)
        e = torch.exp(conserved_source.clamp(-1.0, 1.0))  # (B, H, M)
        competition = nu * e / torch.einsum("jm,bhm->bhj", ones, e)  # nu_j exp(O^_j) / sum_{j' <= j} exp(O^_j')
        row = qp * (incoming / nu)[..., None]
    else:
        allocation = torch.sigmoid(conserved_sink * (N / M))
        competition = torch.softmax(conserved_source.clamp(-1.0, 1.0), dim=-1) * M
        row = qp * incoming[..., None]
    flows = torch.einsum("bhnd,bhmd->bhnm", row, kp) * ones  # (B, H, N, M)
    out = allocation[..., None] * torch.einsum("bhnm,bhme->bhne", flows, vf * competition[..., None])
    return out.to(q.dtype)


# prefix sums carried from one segment to the next: sum K', sum Q', sum K' O, sum Q' I, sum exp(O^),
# and the state (S, z) of the causal linear attention of the output
FlowCarry = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                  tuple[torch.Tensor, torch.Tensor] | None]


def _flow_causal_segment(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], carry: FlowCarry | None,
                         start: int, *, eps: float) -> tuple[torch.Tensor, FlowCarry]:
    """Causal flow-attention of rows ``[start, start + n)`` given the prefix sums of the rows before.

    ``parts``: q ``[B, H, n, D]`` and k, v ``[B, H_kv, n, D|Dv]`` (before the feature map). Every sum of
    the causal formulas is a prefix sum, so a segment needs only the carried totals of the earlier rows
    (Flowformer, arXiv 2202.06258, ``Flow_Attention_Causal``). Returns the output (compute dtype) and the
    totals after the segment.
    """
    q, k, v = parts
    dtype = compute_dtype(q.dtype)
    H = q.shape[1]
    qp = torch.sigmoid(q.to(dtype))  # (B, H, n, D)
    kp = torch.sigmoid(expand_kv(k, H).to(dtype))  # (B, H, n, D)
    vf = expand_kv(v, H).to(dtype)  # (B, H, n, Dv)
    n = qp.shape[2]
    nu = torch.arange(start + 1, start + n + 1, dtype=dtype, device=q.device)  # (n,) nu_i = i + 1

    def prefix(x: torch.Tensor, before: torch.Tensor | None, dim: int = 2) -> torch.Tensor:
        x = x.cumsum(dim)
        return x if before is None else x + before.unsqueeze(dim)

    sk, sq, sko, sqi, se, state = carry if carry is not None else (None,) * 6
    key_sums, query_sums = prefix(kp, sk), prefix(qp, sq)  # (B, H, n, D)
    incoming = nu / torch.einsum("bhnd,bhnd->bhn", qp + eps, key_sums + eps)
    outgoing = nu / torch.einsum("bhnd,bhnd->bhn", kp + eps, query_sums + eps)
    sink_sums = prefix(kp * outgoing[..., None], sko)  # (B, H, n, D)
    source_sums = prefix(qp * incoming[..., None], sqi)
    conserved_sink = torch.einsum("bhnd,bhnd->bhn", qp + eps, sink_sums + eps) / nu
    conserved_source = torch.einsum("bhnd,bhnd->bhn", kp + eps, source_sums + eps) / nu
    allocation = torch.sigmoid(conserved_sink)
    e = torch.exp(conserved_source.clamp(-1.0, 1.0))
    e_sums = prefix(e, se, dim=-1)  # (B, H, n)
    competition = e / e_sums * nu
    # the causal product sum_{j<=i} (a_i . K'_j) c_j v_j as chunked linear attention (no O(N D Dv) memory)
    out, state = linear_attention_chunked(qp * (incoming / nu)[..., None], kp, vf * competition[..., None],
                                          causal=True, feature_map="identity", normalize=False, scale=1.0,
                                          initial_state=state, return_state=True)
    carry = (key_sums[:, :, -1], query_sums[:, :, -1], sink_sums[:, :, -1], source_sums[:, :, -1], e_sums[..., -1],
             state)
    return out * allocation[..., None], carry


def _flow_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, eps: float) -> torch.Tensor:
    """The official code's linear-time order: (prefix) sums, then ``(Q' I) (K'^T (V comp))``.

    Causal: segment by segment (~2 MiB of q, k, v each, :func:`attnlab.ops.lightning.scan_segments`), the
    prefix sums and the linear-attention state carried, so the working set of the cumulative sums and
    products stays in cache and the forward memory is O(segment) beyond inputs and output.
    """
    if causal:
        _, eps = _check(q, k, v, causal=True, eps=eps)
        out, _ = scan_segments(lambda parts, carry, start: _flow_causal_segment(parts, carry, start, eps=eps),
                               (q, k, v), None, segment=segment_length(q, v, 64))
        return out.to(q.dtype)
    qp, kp, vf, eps = _prepare(q, k, v, causal=causal, eps=eps)
    N, M = qp.shape[2], kp.shape[2]
    if not causal:
        incoming = 1.0 / torch.einsum("bhnd,bhd->bhn", qp + eps, kp.sum(2) + eps)
        outgoing = 1.0 / torch.einsum("bhmd,bhd->bhm", kp + eps, qp.sum(2) + eps)
        conserved_sink = torch.einsum("bhnd,bhd->bhn", qp + eps, (kp * outgoing[..., None]).sum(2) + eps)
        conserved_source = torch.einsum("bhmd,bhd->bhm", kp + eps, (qp * incoming[..., None]).sum(2) + eps)
        allocation = torch.sigmoid(conserved_sink * (N / M))
        competition = torch.softmax(conserved_source.clamp(-1.0, 1.0), dim=-1) * M
        kv = torch.einsum("bhmd,bhme->bhde", kp, vf * competition[..., None])  # (B, H, D, Dv)
        out = torch.einsum("bhnd,bhde->bhne", qp * incoming[..., None], kv) * allocation[..., None]
        return out.to(q.dtype)


def flow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, eps: float = 1e-6,
                   impl: Literal["auto", "reference", "linear"] = "auto") -> torch.Tensor:
    """Flow-attention of Flowformer, in linear time.

    "Flowformer: Linearizing Transformers with Conservation Flows" (arXiv 2202.06258), eqs. 4-9. Not causal:
    see the module docstring (allocation ``sigmoid(I^ N / M)``, competition ``softmax(O^) M``).
    Causal (``Flow_Attention_Causal``, ``nu_i = i + 1``, ``N == M``)::

        I_i = nu_i / ((Q'_i + eps) . (sum_{j<=i} K'_j + eps)),  O_j = nu_j / ((K'_j + eps) . (sum_{i<=j} Q'_i + eps))
        I^_i = (Q'_i + eps) . (sum_{j<=i} K'_j O_j + eps) / nu_i,  O^_j = clamp((K'_j + eps) . (sum_{i<=j} Q'_i I_i
        + eps) / nu_j, -1, 1), alloc_i = sigmoid(I^_i), comp_j = nu_j exp(O^_j) / sum_{j'<=j} exp(O^_j'),
        out_i = alloc_i sum_{j<=i} ((Q'_i I_i / nu_i) . K'_j) comp_j v_j

    (The official causal code divides ``I_i`` by ``nu`` with a broadcast that only runs when ``D == N``;
    the per-row division written here is what it means.)

    Args:
        q: ``[B, H, N, D]`` (before the sigmoid feature map); k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]``.
        causal: the causal formulas (self-attention only: ``M == N``).
        eps: the paper's ``eps`` (1e-6).
        impl: "linear" (= "auto", O(N D Dv)) or "reference" (the explicit ``N x M`` form).

    Returns:
        ``[B, H, N, Dv]`` in q's dtype.
    """
    check_causal(causal)
    check_impl(impl, IMPLS)
    form = flow_attention_reference if impl == "reference" else _flow_linear
    return guard_nonfinite(lambda k, v: form(q, k, v, causal=causal, eps=eps), q, k, v, causal=causal)


register(Mechanism(
    name="flow",
    op=flow_attention,
    reference=flow_attention_reference,
    layer=None,
    family="linear",
    paper="Flowformer: Linearizing Transformers with Conservation Flows",
    arxiv="2202.06258",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=False,  # M != N works without causal (see flow_attention); the causal form needs M == N
    supports_gqa=True,
    complexity="O(N d^2)",
    check=CheckConfig(),
))
