"""Transformer-XL relative attention scores as RCMHA uses them: explicit-index reference and shifted form.

Sugiharto et al., "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
arXiv 2308.03429 (relative positional encoding in the attention score), transcribed from the code
(hermansh-id/rcmha ``rcmha/attention.py``, ``RelativeMultiHeadAttention.get_scores``; itself
Transformer-XL, Dai et al., arXiv 1901.02860, section 3.3, terms (a)+(c) and (b)+(d)).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from attnlab.ops.validation import check_impl, check_qkv, check_scale, check_tensor, compute_dtype

__all__ = ["relative_scores", "relative_scores_reference", "relative_attention", "relative_attention_chunked"]

IMPLS = ("auto", "reference", "shift", "chunked")
_QUERY_CHUNK = 256  # query rows per block of the "chunked" attention


def _check_tables(q: torch.Tensor, k: torch.Tensor, pos_embeddings: torch.Tensor, pos_bias: torch.Tensor,
                  query_bias: torch.Tensor) -> int:
    """Check ``R [2P, H, d]``, ``b [2P, H]``, ``u [H, d]`` against ``q [B, H, N, d]``; return ``P``."""
    _, H, N, d = q.shape
    M = k.shape[2]
    check_tensor("pos_embeddings", pos_embeddings, ndim=3, layout="[2P, H, d]")
    check_tensor("pos_bias", pos_bias, ndim=2, layout="[2P, H]")
    check_tensor("query_bias", query_bias, ndim=2, layout="[H, d]")
    twice_p = pos_embeddings.shape[0]
    if twice_p % 2 or tuple(pos_embeddings.shape[1:]) != (H, d):
        raise ValueError(f"pos_embeddings must have shape [2P, H={H}, d={d}], got {tuple(pos_embeddings.shape)}")
    if tuple(pos_bias.shape) != (twice_p, H):
        raise ValueError(f"pos_bias must have shape [2P={twice_p}, H={H}], got {tuple(pos_bias.shape)}")
    if tuple(query_bias.shape) != (H, d):
        raise ValueError(f"query_bias must have shape [H={H}, d={d}], got {tuple(query_bias.shape)}")
    P = twice_p // 2
    if M > P or N > P:
        raise ValueError(f"the relative tables cover distances up to P={P}, got N={N} queries and M={M} keys")
    if N > M:
        raise ValueError(f"queries are the last N of the M keys (memory first): need N <= M, got N={N}, M={M}")
    return P


def relative_scores_reference(q: torch.Tensor, k: torch.Tensor, *, pos_embeddings: torch.Tensor,
                              pos_bias: torch.Tensor, query_bias: torch.Tensor) -> torch.Tensor:
    """``S_ij = (q_i + u) . k_j + q_i . R[P + j - t_i] + b[P + j - t_i]``, indexed explicitly (unscaled).

    RCMHA (arXiv 2308.03429) / Transformer-XL (arXiv 1901.02860) eq. in section 3.3. Queries
    ``q [B, H, N, d]`` are the last ``N`` of the keys ``k [B, H, M, d]`` (``t_i = i + M - N``: a memory of
    ``M - N`` earlier tokens comes first). Returns ``[B, H, N, M]`` in float32 (float64 for float64).
    """
    check_qkv(q, k, k, allow_cross=True)
    P = _check_tables(q, k, pos_embeddings, pos_bias, query_bias)
    dtype = compute_dtype(q.dtype)
    qf, kf = q.to(dtype), k.to(dtype)
    N, M = q.shape[2], k.shape[2]
    t = torch.arange(N, device=q.device)[:, None] + (M - N)  # (N, 1) absolute query positions
    index = P + torch.arange(M, device=q.device)[None, :] - t  # (N, M) row of the tables for (i, j)
    R = pos_embeddings.to(dtype)[index]  # (N, M, H, d)
    b = pos_bias.to(dtype)[index]  # (N, M, H)
    content = torch.einsum("bhnd,bhmd->bhnm", qf + query_bias.to(dtype)[None, :, None, :], kf)
    position = torch.einsum("bhnd,nmhd->bhnm", qf, R) + b.permute(2, 0, 1)[None]
    return content + position


def relative_scores(q: torch.Tensor, k: torch.Tensor, *, pos_embeddings: torch.Tensor, pos_bias: torch.Tensor,
                    query_bias: torch.Tensor, impl: Literal["auto", "reference", "shift"] = "auto") -> torch.Tensor:
    """The scores of :func:`relative_scores_reference`, by the Transformer-XL relative shift (default).

    The positional term is computed once against the ``L = M + N`` table rows ``R[P - M : P + N]``
    (``[N, L]`` per head) and shifted so that row ``i`` starts at column ``N - i``: flattening the
    ``[N, L]`` block and reading it with row stride ``L - 1`` from offset ``N`` is that shift (a view,
    no gather). Same shapes and result as the reference.
    """
    check_impl(impl, IMPLS)
    if impl == "reference":
        return relative_scores_reference(q, k, pos_embeddings=pos_embeddings, pos_bias=pos_bias,
                                         query_bias=query_bias)
    if impl == "chunked":
        raise ValueError("impl='chunked' is a form of relative_attention (blocks of queries); relative_scores "
                         "returns the whole [B, H, N, M] scores: use impl='shift' or 'reference'")
    check_qkv(q, k, k, allow_cross=True)
    P = _check_tables(q, k, pos_embeddings, pos_bias, query_bias)
    dtype = compute_dtype(q.dtype)
    qf, kf = q.to(dtype), k.to(dtype)
    B, H, N, _ = q.shape
    M = k.shape[2]
    L = M + N
    R = pos_embeddings.to(dtype)[P - M:P + N]  # (L, H, d): relative offsets -M .. N-1
    b = pos_bias.to(dtype)[P - M:P + N]  # (L, H)
    content = torch.einsum("bhnd,bhmd->bhnm", qf + query_bias.to(dtype)[None, :, None, :], kf)  # (B, H, N, M)
    full = torch.einsum("bhnd,lhd->bhnl", qf, R) + b.t()[None, :, None, :]  # (B, H, N, L)
    # out[i, j] = full[i, N + j - i]: flat index i * L + N + j - i = N + i * (L - 1) + j
    shifted = full.reshape(B, H, N * L)[..., N:].reshape(B, H, N, L - 1)[..., :M]  # (B, H, N, M)
    return content + shifted


def _relative_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, R: torch.Tensor, b: torch.Tensor,
                    u: torch.Tensor, *, first: int, P: int, causal: bool, scale: float) -> torch.Tensor:
    """Softmax attention of the query rows ``q [B, H, C, d]`` (absolute positions ``first .. first + C - 1``)
    over the keys ``k, v [B, H, K, d|e]`` (positions ``0 .. K - 1``) with the relative scores.

    The positional term for the ``C`` rows needs the table rows of offsets ``-(first + C - 1) .. K - 1 - first``
    (``L = K + C - 1`` rows); computed once against them (``[C, L]``), row ``r`` is read from column
    ``C - 1 - r`` on (the Transformer-XL shift: flat offset ``C - 1``, row stride ``L - 1``).
    """
    B, H, C, _ = q.shape
    K = k.shape[2]
    L = K + C - 1
    lo = P - (first + C - 1)  # table row of the most negative offset
    content = torch.einsum("bhnd,bhmd->bhnm", q + u[None, :, None, :], k)  # (B, H, C, K)
    full = torch.einsum("bhnd,lhd->bhnl", q, R[lo:lo + L]) + b[lo:lo + L].t()[None, :, None, :]  # (B, H, C, L)
    shifted = full.reshape(B, H, C * L)[..., C - 1:C - 1 + C * (L - 1)].reshape(B, H, C, L - 1)[..., :K]
    scores = (content + shifted) * scale  # (B, H, C, K)
    if causal:
        t = torch.arange(first, first + C, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(K, device=q.device)[None, :] > t, float("-inf"))
    return torch.einsum("bhnm,bhme->bhne", torch.softmax(scores, dim=-1), v)  # (B, H, C, e)


def relative_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pos_embeddings: torch.Tensor,
                               pos_bias: torch.Tensor, query_bias: torch.Tensor, causal: bool = False,
                               scale: float | None = None, chunk_size: int = _QUERY_CHUNK) -> torch.Tensor:
    """:func:`relative_attention` in blocks of ``chunk_size`` queries: no ``N x M`` tensor.

    RCMHA (arXiv 2308.03429) / Transformer-XL (arXiv 1901.02860) relative scores. Each block computes
    its ``[C, K]`` scores (causal: only the ``K`` keys up to its last query), softmax and values,
    under activation checkpointing when gradients are needed (recomputed in the backward pass), so
    memory is ``O(C M)`` per block instead of several ``N x M`` tensors; time ``O(N M d)`` (half of
    it when causal).
    """
    sizes = check_qkv(q, k, v, allow_gqa=False)
    scale = check_scale(scale, sizes.head_dim)
    P = _check_tables(q, k, pos_embeddings, pos_bias, query_bias)
    dtype = compute_dtype(q.dtype)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    R, b, u = pos_embeddings.to(dtype), pos_bias.to(dtype), query_bias.to(dtype)
    N, M = sizes.length, sizes.key_length
    outs = []
    for start in range(0, N, chunk_size):
        stop = min(N, start + chunk_size)
        first = start + M - N  # absolute position of the block's first query
        K = first + (stop - start) if causal else M  # causal: keys after the block's last query are unseen
        args = (qf[:, :, start:stop], kf[:, :, :K], vf[:, :, :K], R, b, u)
        options = dict(first=first, P=P, causal=causal, scale=scale)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args):
            outs.append(checkpoint(_relative_block, *args, use_reentrant=False, **options))
        else:
            outs.append(_relative_block(*args, **options))
    return torch.cat(outs, dim=2).to(q.dtype)  # (B, H, N, e)


def relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pos_embeddings: torch.Tensor,
                       pos_bias: torch.Tensor, query_bias: torch.Tensor, causal: bool = False,
                       scale: float | None = None, impl: Literal["auto", "reference", "shift", "chunked"] = "auto"
                       ) -> torch.Tensor:
    """``softmax(scale * S + mask) V`` with the relative scores ``S`` of :func:`relative_scores`.

    RCMHA (arXiv 2308.03429), the attention of ``RelativeMultiHeadAttention``: ``scale`` (default
    ``d ** -0.5``) multiplies every term; ``causal`` masks keys after the query (``j > t_i``).
    ``q [B, H, N, d]``, ``k [B, H, M, d]``, ``v [B, H, M, e]`` -> ``[B, H, N, e]`` in the dtype of q.

    impl: "chunked" (= "auto": blocks of queries, see :func:`relative_attention_chunked`), "shift"
    (the whole ``[N, M]`` scores by the relative shift) or "reference" (explicitly indexed scores).
    """
    check_impl(impl, IMPLS)
    if impl in ("auto", "chunked"):
        return relative_attention_chunked(q, k, v, pos_embeddings=pos_embeddings, pos_bias=pos_bias,
                                          query_bias=query_bias, causal=causal, scale=scale)
    sizes = check_qkv(q, k, v, allow_gqa=False)
    scale = check_scale(scale, sizes.head_dim)
    scores = relative_scores(q, k, pos_embeddings=pos_embeddings, pos_bias=pos_bias, query_bias=query_bias,
                             impl=impl) * scale  # (B, H, N, M)
    N, M = sizes.length, sizes.key_length
    if causal:
        t = torch.arange(N, device=q.device)[:, None] + (M - N)
        scores = scores.masked_fill(torch.arange(M, device=q.device)[None, :] > t, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhnm,bhme->bhne", probs, v.to(probs.dtype)).to(q.dtype)
