"""Sliding-window (local) attention, and the gathered block attention the local/sparse ops share.

Sliding-window attention as used by Longformer (Beltagy et al., "Longformer: The Long-Document
Transformer", arXiv 2004.05150, sec. 3.1) and Mistral: softmax attention restricted to a band.

- causal: key ``j`` is visible to query ``i`` iff ``0 <= i - j < window``;
- non-causal: iff ``|i - j| <= window // 2``.

The fast path (:func:`gathered_block_attention`) processes the queries in blocks of ``Bq``
consecutive positions; each block gathers only the keys its queries may see (a span of
``Bq + window - 1`` keys here), so memory is ``O(N * window)`` instead of ``O(N^2)``, and autograd
gives the backward pass. Neighborhood, dynamic-mask and HiP attention reuse the same helper with
their own key lists and masks. ``impl="flex"`` runs the same band as the ``mask_mod`` of compiled
FlexAttention (:mod:`attnlab.ops.flex`); "auto" picks it on CUDA.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange

from attnlab.ops.flex import auto_uses_flex, flex_masked_attention
from attnlab.ops.softmax import softmax_attention_reference
from attnlab.ops.validation import check_impl, check_qkv, check_scale, compute_dtype
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = [
    "sliding_window_attention",
    "sliding_window_attention_reference",
    "sliding_window_mask",
    "gathered_block_attention",
]

IMPLS = ("auto", "reference", "gather", "flex")


def gathered_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_index: torch.Tensor,
                             allowed: torch.Tensor, scale: float,
                             key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention where each block of queries sees only a gathered list of keys.

    The queries are split into ``G`` blocks of ``Bq`` consecutive positions (the last block is
    padded); block ``g`` attends to the keys ``key_index[..., g, :]`` where ``allowed`` is True.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]`` (``H_kv`` divides ``H``).
        key_index: int64 ``[G, S]`` (shared by every batch element and head) or ``[B, H_kv, G, S]``;
            entries in ``[0, M)``. Padding entries may hold any valid index with ``allowed`` False.
            A key must appear at most once among the allowed entries of a query row.
        allowed: bool ``[G, Bq, S]`` or ``[B, H_kv, G, Bq, S]``; ``G * Bq >= N``.
        scale: multiplies ``q . k``.
        key_bias: optional additive bias per key ``[B, H_kv, M]`` (gathered with the keys).

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q; a query row with no allowed key returns zeros.
        Memory: the gathered keys/values ``[B, H_kv, G, S, D]`` and scores ``[B, H, G, Bq, S]``.
    """
    B, H, N, _ = q.shape
    Hkv = k.shape[1]
    G, Bq, S = allowed.shape[-3:]
    dtype = compute_dtype(q.dtype)
    if G * Bq < N:
        raise ValueError(f"allowed covers {G} blocks of {Bq} queries, fewer than N={N}")
    pad = G * Bq - N
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q  # (B, H, G*Bq, D)
    qb = rearrange(qp.to(dtype), "b (hk g) (c q) d -> b hk g c q d", hk=Hkv, c=G)  # (B, H_kv, H/H_kv, G, Bq, D)
    if key_index.ndim == 2:  # shared by batch and heads
        flat = key_index.reshape(-1)
        kg = k[:, :, flat].to(dtype)  # (B, H_kv, G*S, D)
        vg = v[:, :, flat].to(dtype)  # (B, H_kv, G*S, Dv)
        bias = key_bias[:, :, flat] if key_bias is not None else None  # (B, H_kv, G*S)
        mask = allowed[None, None, None]  # (1, 1, 1, G, Bq, S)
    else:
        flat = key_index.reshape(B, Hkv, G * S)
        kg = torch.gather(k, 2, flat[..., None].expand(-1, -1, -1, k.shape[-1])).to(dtype)
        vg = torch.gather(v, 2, flat[..., None].expand(-1, -1, -1, v.shape[-1])).to(dtype)
        bias = torch.gather(key_bias, 2, flat) if key_bias is not None else None
        mask = allowed[:, :, None]  # (B, H_kv, 1, G, Bq, S)
    kg = rearrange(kg, "b hk (c s) d -> b hk c s d", c=G)  # (B, H_kv, G, S, D)
    vg = rearrange(vg, "b hk (c s) e -> b hk c s e", c=G)  # (B, H_kv, G, S, Dv)
    scores = torch.einsum("bkgcqd,bkcsd->bkgcqs", qb, kg) * scale  # (B, H_kv, H/H_kv, G, Bq, S)
    if bias is not None:
        scores = scores + rearrange(bias.to(dtype), "b hk (c s) -> b hk 1 c 1 s", c=G)
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(dim=-1, keepdim=True)  # rows with no allowed key (only padding rows, normally)
    if bool(empty.any()):
        scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if bool(empty.any()):
        probs = probs.masked_fill(empty, 0.0)
    out = torch.einsum("bkgcqs,bkcse->bkgcqe", probs, vg)  # (B, H_kv, H/H_kv, G, Bq, Dv)
    out = rearrange(out, "b hk g c q e -> b (hk g) (c q) e")[:, :, :N]  # (B, H, N, Dv)
    return out.to(q.dtype)


def _check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got window={window}")
    return window


def _check_self(N: int, M: int, name: str) -> None:
    if N != M:
        raise ValueError(f"{name} is self-attention: k, v must have the length of q (N={N}), got M={M}")


def sliding_window_mask(length: int, window: int, *, causal: bool = False,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``[N, N]`` band mask (True = attend).

    causal: ``0 <= i - j < window``; non-causal: ``|i - j| <= window // 2``.
    """
    window = _check_window(window)
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return _band(i, j, window, causal)


def _band(i: torch.Tensor, j: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    if causal:
        return (i - j >= 0) & (i - j < window)
    return (i - j).abs() <= window // 2


def sliding_window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                                       causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Dense masked softmax ``softmax(scale Q K^T + log(band)) V`` (quadratic; the oracle).

    Longformer (arXiv 2004.05150) sec. 3.1 sliding window; band as in :func:`sliding_window_mask`.
    """
    sizes = check_qkv(q, k, v)
    _check_self(sizes.length, sizes.key_length, "sliding_window_attention")
    mask = sliding_window_mask(sizes.length, window, causal=causal, device=q.device)  # (N, N)
    return softmax_attention_reference(q, k, v, scale=scale, attn_mask=mask)


def _block_size(window: int, length: int) -> int:
    return max(1, min(length, max(32, min(128, window))))


def _band_blocks(length: int, window: int, causal: bool, device: torch.device,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key spans and masks of the query blocks: ``key_index [G, S]``, ``allowed [G, Bq, S]``."""
    Bq = _block_size(window, length)
    G = -(-length // Bq)
    before, after = (window - 1, 0) if causal else (window // 2, window // 2)
    S = Bq + before + after
    starts = torch.arange(G, device=device) * Bq - before  # (G,)
    keys = starts[:, None] + torch.arange(S, device=device)  # (G, S) raw key positions
    queries = (torch.arange(G, device=device) * Bq)[:, None] + torch.arange(Bq, device=device)  # (G, Bq)
    valid = (keys >= 0) & (keys < length)
    allowed = _band(queries[:, :, None], keys[:, None, :], window, causal) & valid[:, None, :]
    allowed &= (queries < length)[:, :, None]
    return keys.clamp(0, length - 1), allowed


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool,
          scale: float) -> torch.Tensor:
    """Compiled FlexAttention with the band of :func:`sliding_window_mask` as its mask_mod."""

    def band_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return _band(q_idx, kv_idx, window, causal)

    key = ("sliding_window", window, causal)
    return flex_masked_attention(q, k, v, mask_mod=band_mask, mask_key=key, scale=scale)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             causal: bool = False, scale: float | None = None,
                             impl: Literal["auto", "reference", "gather", "flex"] = "auto") -> torch.Tensor:
    """Sliding-window softmax attention (self-attention, ``N == M``).

    Longformer, "The Long-Document Transformer" (Beltagy, Peters, Cohan, arXiv 2004.05150),
    sec. 3.1: each token attends to a fixed window around it.

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, N, D|Dv]`` (``H_kv`` divides ``H``).
        window: causal: key ``j`` visible to query ``i`` iff ``0 <= i - j < window``;
            non-causal: iff ``|i - j| <= window // 2``.
        causal: see ``window``.
        scale: default ``D ** -0.5``.
        impl: "reference" (dense masked softmax, ``O(N^2)``), "gather" (query blocks gather their
            key span: ``O(N * window)`` memory in gathered copies, differentiable), "flex"
            (``torch.nn.attention.flex_attention`` compiled, the band as its ``mask_mod`` with a cached
            block mask, see :mod:`attnlab.ops.flex`: fused; forward and backward on CUDA, forward only
            on CPU, where it raises ``NotImplementedError`` when a gradient is needed) or "auto"
            ("flex" on CUDA for float32/bfloat16/float16, where the gathered copies of "gather" cost
            ``(Bq + window - 1) / Bq`` times the keys and values; "gather" otherwise: on CPU compiled
            FlexAttention has no backward and compiles for seconds, float64 is for checks).

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q.
    """
    check_impl(impl, IMPLS)
    if impl == "reference":
        return sliding_window_attention_reference(q, k, v, window=window, causal=causal, scale=scale)
    sizes = check_qkv(q, k, v)
    _check_self(sizes.length, sizes.key_length, "sliding_window_attention")
    window = _check_window(window)
    scale = check_scale(scale, sizes.head_dim)
    if impl == "auto":
        impl = "flex" if auto_uses_flex(q) else "gather"
    if impl == "flex":
        return _flex(q, k, v, window, causal, scale)
    key_index, allowed = _band_blocks(sizes.length, window, causal, q.device)
    return gathered_block_attention(q, k, v, key_index=key_index, allowed=allowed, scale=scale)


register(Mechanism(
    name="sliding_window",
    op=sliding_window_attention,
    reference=sliding_window_attention_reference,
    layer=None,
    family="local",
    paper="Longformer: The Long-Document Transformer",
    arxiv="2004.05150",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=False,
    supports_gqa=True,
    complexity="O(N w d)",
    defaults={"causal": True, "scale": None, "impl": "auto"},
    impls=("gather", "flex"),
    check=CheckConfig(options={"window": 4}, bf16_options={"window": 64}, gradcheck_length=6),
))
