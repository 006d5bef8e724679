"""DMA: trainable dynamic mask sparse attention (Doge / flash-dmattn).

Shi et al., "Trainable Dynamic Mask Sparse Attention" (arXiv 2508.02124; code SmallDoges/flash-dmattn,
``dynamic_mask_attention_python`` of ``benchmarks/forward_equivalence.py``). A per-key additive bias
(computed by the layer from the values, see :class:`attnlab.nn.DynamicMaskAttention`) both shifts
the scores and chooses which keys each query keeps:

``S = scale Q K^T + bias``; each query keeps the ``k_budget`` allowed keys with the largest bias
(``torch.topk`` on the detached bias: the selection is not differentiated, the bias is);
``O = softmax(S masked to the kept keys) V``.
"""

from __future__ import annotations

from typing import Literal

import torch

from attnlab.ops.sliding_window import gathered_block_attention
from attnlab.ops.softmax import attention_mask
from attnlab.ops.validation import (
    Sizes,
    check_causal_lengths,
    check_impl,
    check_qkv,
    check_scale,
    check_tensor,
    compute_dtype,
    expand_kv,
)

__all__ = ["dynamic_mask_attention", "dynamic_mask_attention_reference", "dynamic_mask_select"]

IMPLS = ("auto", "reference", "gather")
_QUERY_CHUNK = 256  # queries whose top-k is computed at once: O(chunk * M) memory


def _check(sizes: Sizes, key_bias: torch.Tensor, k_budget: int, causal: bool) -> torch.Tensor:
    B, H, Hkv, N, M, _, _ = sizes
    check_tensor("key_bias", key_bias, ndim=3, layout="[B, H_kv, M]")
    if key_bias.shape[0] not in (1, B) or key_bias.shape[1] not in (1, Hkv) or key_bias.shape[2] != M:
        raise ValueError(f"key_bias must have shape [B, H_kv, M] = [{B}, {Hkv}, {M}] (size-1 B or H_kv "
                         f"broadcast), got {tuple(key_bias.shape)}")
    if isinstance(k_budget, bool) or not isinstance(k_budget, int):
        raise TypeError(f"k_budget must be an int, got {type(k_budget).__name__}")
    if k_budget < 1:
        raise ValueError(f"k_budget must be >= 1, got k_budget={k_budget}")
    if causal:
        check_causal_lengths(N, M)
    return key_bias.expand(B, Hkv, M)


def dynamic_mask_select(key_bias: torch.Tensor, length: int, *, k_budget: int, causal: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the keys each query keeps: the ``k_budget`` allowed keys of largest bias.

    Args:
        key_bias: ``[B, H_kv, M]`` (only its values are used; no gradient).
        length: N queries (causal: aligned to the end of the keys, query ``i`` may see ``j <= i + M - N``).

    Returns:
        ``index [B, H_kv, N, W]`` int64 and ``kept [B, H_kv, N, W]`` bool with ``W = min(k_budget, M)``;
        ``kept`` is False where a causal query has fewer than ``W`` allowed keys.
    """
    B, Hkv, M = key_bias.shape
    W = min(k_budget, M)
    bias = key_bias.detach()
    index, kept = [], []
    for start in range(0, length, _QUERY_CHUNK):
        stop = min(length, start + _QUERY_CHUNK)
        scores = bias[:, :, None, :].expand(B, Hkv, stop - start, M)  # (B, H_kv, C, M)
        if causal:
            i = torch.arange(start, stop, device=bias.device)[:, None] + (M - length)
            j = torch.arange(M, device=bias.device)[None, :]
            scores = scores.masked_fill(j > i, float("-inf"))
        values, chosen = torch.topk(scores, W, dim=-1)  # (B, H_kv, C, W)
        index.append(chosen)
        kept.append(values > float("-inf"))
    return torch.cat(index, dim=2), torch.cat(kept, dim=2)


def dynamic_mask_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                     key_bias: torch.Tensor, k_budget: int, causal: bool = False,
                                     scale: float | None = None) -> torch.Tensor:
    """Dense transcription of ``dynamic_mask_attention_python`` (flash-dmattn; arXiv 2508.02124).

    ``bias' = detach(bias)`` masked to ``-inf`` outside the causal mask; if ``M > k_budget`` keep
    the top-``k_budget`` entries of ``bias'`` per query (excluding ``-inf`` ones); scores
    ``scale Q K^T + bias`` masked to the kept keys; softmax; times V.
    """
    sizes = check_qkv(q, k, v)
    B, H, Hkv, N, M, D, _ = sizes
    scale = check_scale(scale, D)
    key_bias = _check(sizes, key_bias, k_budget, causal)
    dtype = compute_dtype(q.dtype)
    bias = expand_kv(key_bias[..., None], H)[..., 0].to(dtype)[:, :, None, :]  # (B, H, 1, M)
    allowed = attention_mask(N, M, causal=causal, device=q.device)  # (N, M) or None
    allowed = torch.ones(N, M, dtype=torch.bool, device=q.device) if allowed is None else allowed
    allowed = allowed.expand(B, H, N, M)
    if M > k_budget:
        masked = bias.detach().expand(B, H, N, M).masked_fill(~allowed, float("-inf"))
        values, top = torch.topk(masked, k_budget, dim=-1)  # (B, H, N, window)
        keep = torch.zeros(B, H, N, M, dtype=torch.bool, device=q.device)
        keep.scatter_(-1, top, values > float("-inf"))
        allowed = keep
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(dtype), expand_kv(k, H).to(dtype)) * scale + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H, N, M)
    return torch.einsum("bhnm,bhme->bhne", probs, expand_kv(v, H).to(dtype)).to(q.dtype)


def dynamic_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_bias: torch.Tensor,
                           k_budget: int, causal: bool = False, scale: float | None = None,
                           impl: Literal["auto", "reference", "gather"] = "auto") -> torch.Tensor:
    """Dynamic mask attention (DMA): per-key bias added to the scores and choosing the kept keys.

    Shi et al., "Trainable Dynamic Mask Sparse Attention", arXiv 2508.02124 (flash-dmattn's
    ``dynamic_mask_attention_python``; mask type "topk").

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]``.
        key_bias: ``[B, H_kv, M]`` additive bias per key (size-1 ``B`` / ``H_kv`` broadcast); query head
            ``h`` uses kv head ``h // (H // H_kv)``; gradients flow to it through the scores.
        k_budget: keys kept per query (the ``k_budget`` allowed keys of largest bias; all of
            them when ``M <= k_budget``). Ties are broken by ``torch.topk``.
        causal: query ``i`` may see keys ``j <= i + M - N`` (queries aligned to the end of the keys).
        scale: default ``D ** -0.5``.
        impl: "reference" (dense ``N x M`` scores), "gather" (per query, gathers its kept keys:
            ``O(N * k_budget)`` memory for the attention, top-k in chunks of queries) or "auto" (= "gather").

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q.
    """
    check_impl(impl, IMPLS)
    if impl == "reference":
        return dynamic_mask_attention_reference(q, k, v, key_bias=key_bias, k_budget=k_budget,
                                                causal=causal, scale=scale)
    sizes = check_qkv(q, k, v)
    scale = check_scale(scale, sizes.head_dim)
    key_bias = _check(sizes, key_bias, k_budget, causal)
    index, kept = dynamic_mask_select(key_bias, sizes.length, k_budget=k_budget, causal=causal)
    # one query per block: key_index [B, H_kv, N, W], allowed [B, H_kv, N, 1, W]
    return gathered_block_attention(q, k, v, key_index=index, allowed=kept[:, :, :, None, :], scale=scale,
                                    key_bias=key_bias)
