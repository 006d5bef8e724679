"""Linear attention: a kernel feature map instead of the softmax, computed as a running sum.

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (Katharopoulos et al.,
arXiv 2006.16236), eqs. 4-6 (normalised form) and eqs. 16-20 (the causal recurrence)::

    o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),  S_i = sum_{j<=i} phi(k_j)^T v_j,  z_i = sum_{j<=i} phi(k_j)

(all ``j`` when not causal). Forms here: :func:`linear_attention_reference` (quadratic, masked),
:func:`linear_attention_chunked` (the fast path), :func:`linear_attention_recurrent` and
:func:`linear_attention_step` for decoding one token at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from attnlab.ops.lightning import check_chunk_size, check_state, scan_segments, segment_length
from attnlab.ops.nonfinite import nonfinite_guarded
from attnlab.ops.validation import (
    Sizes,
    check_bool,
    check_causal,
    check_causal_lengths,
    check_impl,
    check_qkv,
    check_scale,
    compute_dtype,
    expand_kv,
)
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = [
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_chunked",
    "linear_attention_recurrent",
    "linear_attention_step",
    "FEATURE_MAPS",
    "taylor_feature_map",
    "feature_similarity",
    "feature_count",
]

IMPLS = ("auto", "reference", "chunked", "recurrent", "triton")

FeatureMap = str | Callable[[torch.Tensor], torch.Tensor]
State = tuple[torch.Tensor, torch.Tensor]


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """Based's order-2 Taylor feature map ``[..., d] -> [..., 1 + d + d^2]``.

    "Simple linear attention language models balance the recall-throughput tradeoff" (Arora et al.,
    arXiv 2402.18668; the ``TaylorExp`` map of the authors' code):
    ``phi(x) = [1, x / d^{1/4}, (x x^T flattened) / (sqrt(2) sqrt(d))]``, so that
    ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(d)``: the second-order Taylor
    expansion of ``exp(q . k / sqrt(d))``. Every ordered pair ``(i, j)`` is kept (``d^2`` entries, as
    Based's code does), not the ``d (d + 1) / 2`` distinct products; the state then has
    ``1 + d + d^2`` rows per head.
    """
    d = x.shape[-1]
    ones = x.new_ones(*x.shape[:-1], 1)  # (..., 1)
    outer = torch.einsum("...i,...j->...ij", x, x).flatten(-2)  # (..., d * d)
    return torch.cat([ones, x / d ** 0.25, outer / (math.sqrt(2.0) * math.sqrt(d))], dim=-1)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu+1": _elu_plus_one,  # Katharopoulos et al., eq. 7
    "relu": F.relu,
    "identity": _identity,
    "taylor": taylor_feature_map,  # Arora et al. (Based), arXiv 2402.18668
}


def _explicit_elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    # elu(x) + 1 written out: x + 1 above zero, exp(x) below (clamped so the unused branch stays finite
    # and its gradient is not inf * 0)
    return torch.where(x > 0, x + 1, torch.exp(x.clamp(max=0)))


def _explicit_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def feature_similarity(feature_map: FeatureMap, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``phi(q_i) . phi(k_j)`` written out without the feature maps above: ``[..., N, D], [..., M, D] -> [..., N, M]``.

    The oracle of :func:`linear_attention_reference`. "elu+1" and "relu" are transcribed elementwise;
    "taylor" is the kernel it expands, ``1 + s + s^2 / 2`` with ``s = q . k / sqrt(d)`` (Arora et al.,
    arXiv 2402.18668), so the ``d^2`` feature vector is never built; a callable map is applied as given.
    """
    phi = resolve_feature_map(feature_map)  # validates a name or a callable
    if feature_map == "taylor":
        s = torch.einsum("...nd,...md->...nm", q, k) / math.sqrt(q.shape[-1])  # (..., N, M)
        return 1 + s + s * s / 2
    if isinstance(feature_map, str):
        phi = {"elu+1": _explicit_elu_plus_one, "relu": _explicit_relu, "identity": _identity}[feature_map]
    return torch.einsum("...nf,...mf->...nm", phi(q), phi(k))


def feature_count(feature_map: FeatureMap, dim: int) -> int:
    """Number of features ``F`` that ``feature_map`` makes of ``dim`` inputs (rows of the state ``S``).

    ``dim`` for "elu+1", "relu" and "identity", ``1 + dim + dim^2`` for "taylor"; a callable is run once
    on a zero vector to find out.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got dim={dim!r}")
    if isinstance(feature_map, str):
        resolve_feature_map(feature_map)
        return 1 + dim + dim * dim if feature_map == "taylor" else dim
    return int(resolve_feature_map(feature_map)(torch.zeros(1, dim)).shape[-1])


def resolve_feature_map(feature_map: FeatureMap) -> Callable[[torch.Tensor], torch.Tensor]:
    """A feature-map name ("elu+1", "relu", "identity", "taylor") or a callable ``[..., D] -> [..., F]``."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r} is not one of {', '.join(map(repr, FEATURE_MAPS))} "
                             f"(or pass a callable)")
        return FEATURE_MAPS[feature_map]
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a name or a callable, got {type(feature_map).__name__}")
    return feature_map


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not (0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got eps={eps!r}")
    return float(eps)


def _features(phi: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    out = phi(x)
    if not isinstance(out, torch.Tensor) or out.shape[:-1] != x.shape[:-1]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"feature_map must map {name} {tuple(x.shape)} to [..., F] keeping the leading "
                         f"dimensions, got {got}")
    return out


def _check_initial_state(state: object, sizes: Sizes, features: int, device: torch.device) -> State:
    B, H, Dv = sizes.batch, sizes.heads, sizes.value_dim
    if not (isinstance(state, tuple | list) and len(state) == 2):
        raise TypeError(f"initial_state must be the tuple (S [B, H, F, Dv], z [B, H, F]) = "
                        f"([{B}, {H}, {features}, {Dv}], [{B}, {H}, {features}]), got {type(state).__name__}")
    S = check_state("initial_state[0] (S)", state[0], (B, H, features, Dv), device)
    z = check_state("initial_state[1] (z)", state[1], (B, H, features), device)
    return S, z


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, feature_map: FeatureMap,
             eps: float, scale: float | None, initial_state: object
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float, State | None]:
    """Validate; return phi(q), phi(k), v (H heads, compute dtype), scale, eps and the state."""
    sizes = check_qkv(q, k, v)
    if causal:
        check_causal_lengths(sizes.length, sizes.key_length)
    scale = check_scale(scale, sizes.head_dim)
    eps = _check_eps(eps)
    phi = resolve_feature_map(feature_map)
    dtype = compute_dtype(q.dtype)
    fq = _features(phi, q.to(dtype), "q")  # (B, H, N, F)
    fk = _features(phi, expand_kv(k, sizes.heads).to(dtype), "k")  # (B, H, M, F)
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map gave q {fq.shape[-1]} and k {fk.shape[-1]} features")
    vf = expand_kv(v, sizes.heads).to(dtype)  # (B, H, M, Dv)
    state = None
    if initial_state is not None:
        S, z = _check_initial_state(initial_state, sizes, fq.shape[-1], q.device)
        state = (S.to(dtype), z.to(dtype))
    return fq, fk, vf, scale, eps, state


def _read_out(num: torch.Tensor, den: torch.Tensor, *, normalize: bool, scale: float, eps: float,
              dtype: torch.dtype) -> torch.Tensor:
    if normalize:
        return (scale * num / (scale * den[..., None] + eps)).to(dtype)
    return (scale * num).to(dtype)


def _prefix(fk: torch.Tensor, vf: torch.Tensor, state: State | None, count: int) -> State | None:
    """Causal queries aligned to the end of the keys: the first ``M - N`` keys are seen by every query."""
    if count == 0:
        return state
    S = torch.einsum("bhmf,bhme->bhfe", fk[:, :, :count], vf[:, :, :count])
    z = fk[:, :, :count].sum(2)
    return (S, z) if state is None else (state[0] + S, state[1] + z)


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                               feature_map: FeatureMap = "elu+1", normalize: bool = True, eps: float = 1e-6,
                               scale: float | None = 1.0, chunk_size: int = 64, initial_state: State | None = None,
                               return_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, State]:
    """The quadratic form: ``A = phi(Q) phi(K)^T`` (masked ``j <= i + M - N`` when causal),
    ``O = scale * A V / (scale * A 1 + eps)`` (Katharopoulos et al., arXiv 2006.16236, eq. 6).

    ``A`` comes from :func:`feature_similarity`, the maps written out (for "taylor" the kernel
    ``1 + s + s^2 / 2`` itself), so this oracle does not share the feature-map code of the fast forms.

    An initial state ``(S0, z0)`` adds ``phi(q_i) S0`` to the numerator and ``phi(q_i) . z0`` to the
    denominator. ``chunk_size`` is accepted and ignored. Shapes as in :func:`linear_attention`.
    """
    check_causal(causal)
    check_chunk_size(chunk_size)
    fq, fk, vf, scale, eps, state = _prepare(q, k, v, causal=causal, feature_map=feature_map, eps=eps,
                                             scale=scale, initial_state=initial_state)
    N, M = fq.shape[2], fk.shape[2]
    # the similarities from the explicit kernel (not the features fq, fk): an oracle independent of the maps
    scores = feature_similarity(feature_map, q.to(fq.dtype), expand_kv(k, q.shape[1]).to(fq.dtype))  # (B, H, N, M)
    if causal:
        allowed = torch.arange(M, device=q.device)[None, :] <= torch.arange(N, device=q.device)[:, None] + (M - N)
        scores = scores * allowed
    num = torch.einsum("bhnm,bhme->bhne", scores, vf)  # (B, H, N, Dv)
    den = scores.sum(-1)  # (B, H, N)
    if state is not None:
        num = num + torch.einsum("bhnf,bhfe->bhne", fq, state[0])
        den = den + torch.einsum("bhnf,bhf->bhn", fq, state[1])
    out = _read_out(num, den, normalize=normalize, scale=scale, eps=eps, dtype=q.dtype)
    if not return_state:
        return out
    final = (torch.einsum("bhmf,bhme->bhfe", fk, vf), fk.sum(2))
    if state is not None:
        final = (final[0] + state[0], final[1] + state[1])
    return out, final


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                             feature_map: FeatureMap = "elu+1", normalize: bool = True, eps: float = 1e-6,
                             scale: float | None = 1.0, chunk_size: int = 64, initial_state: State | None = None,
                             return_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, State]:
    """The fast path, O(N C F + N F Dv) time.

    Not causal: ``S = phi(K)^T V``, ``z = phi(K)^T 1`` once, then ``phi(Q) S`` (eq. 5-6 of
    arXiv 2006.16236). Causal: blocks of ``chunk_size`` rows; inside a block the masked quadratic
    form, across blocks the state ``S, z`` before the block (an exclusive prefix sum over blocks).
    Causal self-attention longer than a segment (~2 MiB of q, k, v) runs segment by segment, the
    state ``(S, z)`` carried (:func:`attnlab.ops.lightning.scan_segments`): the features, scores and
    block states of one segment at a time (forward memory O(segment) beyond inputs and output).
    """
    chunk_size = check_chunk_size(chunk_size)
    options = dict(feature_map=feature_map, normalize=normalize, eps=eps, scale=scale, chunk_size=chunk_size)
    sizes = check_qkv(q, k, v)
    if causal is True and sizes.length == sizes.key_length > segment_length(q, v, chunk_size):

        def step(parts: tuple, state: State | None, start: int) -> tuple[torch.Tensor, State]:
            return _linear_chunked_segment(*parts, causal=True, initial_state=state, return_state=True, **options)

        out, state = scan_segments(step, (q, k, v), initial_state, segment=segment_length(q, v, chunk_size))
        return (out, state) if return_state else out
    return _linear_chunked_segment(q, k, v, causal=causal, initial_state=initial_state, return_state=return_state,
                                   **options)


def _linear_chunked_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                            feature_map: FeatureMap, normalize: bool, eps: float, scale: float | None,
                            chunk_size: int, initial_state: State | None,
                            return_state: bool) -> torch.Tensor | tuple[torch.Tensor, State]:
    """:func:`linear_attention_chunked` in one piece."""
    fq, fk, vf, scale, eps, state = _prepare(q, k, v, causal=causal, feature_map=feature_map, eps=eps,
                                             scale=scale, initial_state=initial_state)
    N, M = fq.shape[2], fk.shape[2]
    if not causal:
        S = torch.einsum("bhmf,bhme->bhfe", fk, vf)  # (B, H, F, Dv)
        z = fk.sum(2)  # (B, H, F)
        if state is not None:
            S, z = S + state[0], z + state[1]
        num = torch.einsum("bhnf,bhfe->bhne", fq, S)
        den = torch.einsum("bhnf,bhf->bhn", fq, z)
        out = _read_out(num, den, normalize=normalize, scale=scale, eps=eps, dtype=q.dtype)
        return (out, (S, z)) if return_state else out
    state = _prefix(fk, vf, state, M - N)
    fk, vf = fk[:, :, M - N:], vf[:, :, M - N:]
    C = min(chunk_size, N)  # a chunk longer than the sequence is one chunk of N rows
    chunks = math.ceil(N / C)
    pad = chunks * C - N

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, X) -> (B, H, c, C, X), zero padded
        return rearrange(F.pad(x, (0, 0, 0, pad)), "b h (c t) x -> b h c t x", t=C)

    qc, kc, vc = blocks(fq), blocks(fk), blocks(vf)  # padded features are zero: they add nothing
    tril = torch.ones(C, C, device=q.device, dtype=fq.dtype).tril()
    scores = torch.einsum("bhcif,bhcjf->bhcij", qc, kc) * tril  # (B, H, c, C, C)
    num = torch.einsum("bhcij,bhcje->bhcie", scores, vc)  # (B, H, c, C, Dv)
    den = scores.sum(-1)  # (B, H, c, C)
    block_S = torch.einsum("bhcjf,bhcje->bhcfe", kc, vc)  # (B, H, c, F, Dv)
    block_z = kc.sum(3)  # (B, H, c, F)
    S_after, z_after = torch.cumsum(block_S, dim=2), torch.cumsum(block_z, dim=2)
    S_before, z_before = S_after - block_S, z_after - block_z  # exclusive prefix sums
    if state is not None:
        S_before = S_before + state[0][:, :, None]
        z_before = z_before + state[1][:, :, None]
    num = num + torch.einsum("bhcif,bhcfe->bhcie", qc, S_before)
    den = den + torch.einsum("bhcif,bhcf->bhci", qc, z_before)
    num = rearrange(num, "b h c t e -> b h (c t) e")[:, :, :N]
    den = rearrange(den, "b h c t -> b h (c t)")[:, :, :N]
    out = _read_out(num, den, normalize=normalize, scale=scale, eps=eps, dtype=q.dtype)
    if not return_state:
        return out
    final_S, final_z = S_after[:, :, -1], z_after[:, :, -1]
    if state is not None:
        final_S, final_z = final_S + state[0], final_z + state[1]
    return out, (final_S, final_z)


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                               feature_map: FeatureMap = "elu+1", normalize: bool = True, eps: float = 1e-6,
                               scale: float | None = 1.0, chunk_size: int = 64, initial_state: State | None = None,
                               return_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, State]:
    """Token by token (arXiv 2006.16236, eqs. 18-20): ``S_i = S_{i-1} + phi(k_i)^T v_i``,
    ``z_i = z_{i-1} + phi(k_i)``, ``o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps)``.

    Not causal: every key is written first, then every query reads the final state.
    """
    check_chunk_size(chunk_size)
    fq, fk, vf, scale, eps, state = _prepare(q, k, v, causal=causal, feature_map=feature_map, eps=eps,
                                             scale=scale, initial_state=initial_state)
    B, H, N, Fd = fq.shape
    M, Dv = fk.shape[2], vf.shape[-1]
    if state is None:
        state = (fq.new_zeros(B, H, Fd, Dv), fq.new_zeros(B, H, Fd))
    written = M - N if causal else M
    S, z = state
    keys, values, queries = fk.unbind(2), vf.unbind(2), fq.unbind(2)  # unbind once: cheap backward
    for j in range(written):
        S = S + keys[j][..., None] * values[j][..., None, :]
        z = z + keys[j]
    nums, dens = [], []
    for i in range(N):
        if causal:
            j = written + i
            S = S + keys[j][..., None] * values[j][..., None, :]
            z = z + keys[j]
        nums.append(torch.einsum("bhf,bhfe->bhe", queries[i], S))
        dens.append(torch.einsum("bhf,bhf->bh", queries[i], z))
    out = _read_out(torch.stack(nums, 2), torch.stack(dens, 2), normalize=normalize, scale=scale, eps=eps,
                    dtype=q.dtype)
    return (out, (S, z)) if return_state else out


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State | None = None, *,
                          feature_map: FeatureMap = "elu+1", normalize: bool = True, eps: float = 1e-6,
                          scale: float | None = 1.0) -> tuple[torch.Tensor, State]:
    """Decode one token (arXiv 2006.16236, eqs. 18-20).

    Args:
        q: ``[B, H, 1, D]``; k: ``[B, H_kv, 1, D]``; v: ``[B, H_kv, 1, Dv]``.
        state: ``(S [B, H, F, Dv], z [B, H, F])`` from the previous step, or ``None`` at the start.

    Returns:
        ``(o [B, H, 1, Dv], new_state)``; N calls equal ``linear_attention(..., causal=True)``.
    """
    if q.ndim == 4 and q.shape[2] != 1:
        raise ValueError(f"linear_attention_step takes one token: q must have N=1, got N={q.shape[2]}")
    return linear_attention_recurrent(q, k, v, causal=True, feature_map=feature_map, normalize=normalize, eps=eps,
                                      scale=scale, initial_state=state, return_state=True)


def _linear_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                             feature_map: FeatureMap, normalize: bool, eps: float, scale: float | None,
                             chunk_size: int, initial_state: State | None, return_state: bool,
                             kernel: Callable[..., object]) -> torch.Tensor | tuple[torch.Tensor, State]:
    """Causal linear attention by the Triton lightning kernels (see :func:`linear_attention`)."""
    sizes = check_qkv(q, k, v)
    if not causal or sizes.length != sizes.key_length:
        raise ValueError(f"impl='triton' runs causal self-attention only, got causal={causal}, "
                         f"N={sizes.length}, M={sizes.key_length}")
    return kernel(q, k, v, feature_map=resolve_feature_map(feature_map), normalize=normalize, eps=eps,
                  scale=check_scale(scale, sizes.head_dim), chunk_size=check_chunk_size(chunk_size),
                  initial_state=initial_state, return_state=return_state)


@nonfinite_guarded
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     feature_map: FeatureMap = "elu+1", normalize: bool = True, eps: float = 1e-6,
                     scale: float | None = 1.0, chunk_size: int = 64, initial_state: State | None = None,
                     return_state: bool = False,
                     impl: Literal["auto", "reference", "chunked", "recurrent", "triton"] = "auto",
                     ) -> torch.Tensor | tuple[torch.Tensor, State]:
    """Linear attention ``o_i = phi(q_i) S_i / (phi(q_i) . z_i + eps)`` with a kernel feature map.

    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (arXiv 2006.16236),
    eq. 6 (and eqs. 18-20 for the causal recurrence).

    Args:
        q: queries ``[B, H, N, D]``; k: keys ``[B, H_kv, M, D]``; v: values ``[B, H_kv, M, Dv]``
            (``H_kv`` divides ``H``).
        causal: query ``i`` sees keys ``j <= i + M - N`` (queries aligned to the end of the keys).
        feature_map: "elu+1" (the paper's ``elu(x) + 1``), "relu", "identity", "taylor" (Based's
            order-2 Taylor expansion of ``exp(q . k / sqrt(D))``, ``F = 1 + D + D^2`` features; Arora et al.,
            arXiv 2402.18668; see :func:`taylor_feature_map`), or a callable ``[..., D] -> [..., F]``
            applied to q and k.
        normalize: divide by ``phi(q_i) . z_i + eps``; ``False`` gives ``scale * phi(q_i) S_i``.
        eps: added to the denominator.
        scale: multiplies ``phi(q)`` in numerator and denominator (default 1.0; ``None`` means ``D**-0.5``).
        chunk_size: block length of the causal chunked form.
        initial_state: ``(S0 [B, H, F, Dv], z0 [B, H, F])`` added to the running sums.
        return_state: also return the final ``(S, z)`` (float32; float64 for float64 inputs).
        impl: "chunked", "recurrent", "reference" (quadratic) or "triton" (the lightning kernels with no
            decay, causal self-attention only, ``F <= 256``: CUDA, or CPU under ``TRITON_INTERPRET=1``). "auto"
            runs "triton" for causal self-attention on CUDA devices when the features fit and "chunked"
            otherwise.

    Returns:
        ``o [B, H, N, Dv]`` in q's dtype, or ``(o, (S, z))``.
    """
    check_causal(causal)
    check_impl(impl, IMPLS)
    check_bool("normalize", normalize)
    check_bool("return_state", return_state)
    if impl == "triton" or (impl == "auto" and q.is_cuda and causal and q.shape[-2] == k.shape[-2]):
        from attnlab.kernels.lightning import _MAX_HEAD_DIM, linear_attention_triton, triton_runs_on

        # "auto" keeps to feature maps whose state fits the kernels' tile (F <= 256): Based's Taylor map at
        # D = 16 has 273 features and runs chunked
        if impl == "triton" or (triton_runs_on(q) and feature_count(feature_map, q.shape[-1]) <= _MAX_HEAD_DIM):
            return _linear_attention_kernel(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                            eps=eps, scale=scale, chunk_size=chunk_size, initial_state=initial_state,
                                            return_state=return_state, kernel=linear_attention_triton)
    form = {"reference": linear_attention_reference, "recurrent": linear_attention_recurrent}.get(
        impl, linear_attention_chunked)
    return form(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, eps=eps, scale=scale,
                chunk_size=chunk_size, initial_state=initial_state, return_state=return_state)


register(Mechanism(
    name="linear",
    op=linear_attention,
    reference=linear_attention_reference,
    layer=None,
    family="linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    arxiv="2006.16236",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=True,
    supports_gqa=True,
    complexity="O(N d^2)",
    impl_devices={"triton": ("cuda", "triton-interpreter")},
    causal_only_impls=("triton",),
    check=CheckConfig(options={"chunk_size": 4}, bf16_options={"chunk_size": 64}),
    state_size=lambda heads, head_dim, value_dim: heads * head_dim * (value_dim + 1),
))
