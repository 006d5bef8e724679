"""Softmax attention: the baseline every other mechanism is compared with.

"Attention Is All You Need" (Vaswani et al., arXiv 1706.03762), eq. 1:
``Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V``.
"""

from __future__ import annotations

from typing import Literal

import torch

from attnlab.ops.softmax_backends import choose_backend, record_refusal, sdpa_with_backend
from attnlab.ops.validation import (
    Sizes,
    check_causal_lengths,
    check_impl,
    check_qkv,
    check_scale,
    compute_dtype,
    expand_kv,
)
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["softmax_attention", "softmax_attention_reference", "attention_mask"]

IMPLS = ("auto", "reference", "sdpa")


def _check_masks(sizes: Sizes, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 device: torch.device) -> None:
    B, H, _, N, M, _, _ = sizes
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(
                f"attn_mask must be boolean (True = may attend) or an additive float, got {attn_mask.dtype}"
            )
        try:
            if attn_mask.ndim > 4:
                raise RuntimeError
            torch.broadcast_shapes(attn_mask.shape, (B, H, N, M))
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, H, N, M] = "
                f"{[B, H, N, M]}"
            ) from None
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, q on {device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be boolean (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(
                f"key_padding_mask must have shape [B, M] = {[B, M]}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {device}")


def attention_mask(length: int, key_length: int, *, causal: bool = False,
                   attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                   device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                   ) -> torch.Tensor | None:
    """Combine the causal rule and the masks into one mask broadcastable to ``[B, H, N, M]``.

    Causal queries are aligned to the end of the keys: query ``i`` sees keys ``j <= i + M - N``.
    Returns ``None`` when nothing is masked, a boolean mask (True = may attend) when every part is
    boolean, else an additive float mask of ``dtype`` (``-inf`` where not allowed).
    """
    parts: list[torch.Tensor] = []
    if causal:
        i = torch.arange(length, device=device)[:, None]
        j = torch.arange(key_length, device=device)[None, :]
        parts.append(j <= i + (key_length - length))  # (N, M)
    if key_padding_mask is not None:
        parts.append(key_padding_mask[:, None, None, :])  # (B, 1, 1, M)
    boolean = [p for p in parts if p.dtype == torch.bool]
    allowed = None
    for p in boolean:
        allowed = p if allowed is None else allowed & p
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask if allowed is None else allowed & attn_mask
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return allowed
    additive = attn_mask.to(dtype)
    if allowed is not None:
        additive = additive.masked_fill(~allowed, float("-inf"))
    return additive


def _empty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Rows ``[..., N, 1]`` of a combined mask that allow no key, or ``None`` when there are none."""
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
    empty = ~allowed.any(dim=-1, keepdim=True)
    return empty if bool(empty.any()) else None


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                                scale: float | None = None, attn_mask: torch.Tensor | None = None,
                                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(Q K^T * scale + mask) V`` written out, in float32 (float64 for float64 inputs).

    Vaswani et al., "Attention Is All You Need", arXiv 1706.03762, eq. 1. Shapes as in
    :func:`softmax_attention`. The oracle of the conformance suite.
    """
    sizes = check_qkv(q, k, v)
    scale = check_scale(scale, sizes.head_dim)
    _check_masks(sizes, attn_mask, key_padding_mask, q.device)
    if causal:
        check_causal_lengths(sizes.length, sizes.key_length)
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype)  # (B, H, N, D)
    kf = expand_kv(k, sizes.heads).to(dtype)  # (B, H, M, D)
    vf = expand_kv(v, sizes.heads).to(dtype)  # (B, H, M, Dv)
    scores = torch.einsum("bhnd,bhmd->bhnm", qf, kf) * scale  # (B, H, N, M)
    mask = attention_mask(sizes.length, sizes.key_length, causal=causal, attn_mask=attn_mask,
                          key_padding_mask=key_padding_mask, device=q.device, dtype=dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    empty = _empty_rows(mask)
    if empty is not None:
        scores = scores.masked_fill(empty, 0.0)  # any finite row; its output is zeroed below
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhnm,bhme->bhne", probs, vf)  # (B, H, N, Dv)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out.to(q.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: Sizes, *, causal: bool, scale: float,
          attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
          choose: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with end-aligned causal masks and zeroed empty rows.

    ``choose``: use the backend measured fastest on this device (CUDA only; see softmax_backends).
    """
    square_causal = causal and sizes.length == sizes.key_length
    if square_causal and attn_mask is None and key_padding_mask is None:
        mask, is_causal = None, True
    else:
        mask = attention_mask(sizes.length, sizes.key_length, causal=causal, attn_mask=attn_mask,
                              key_padding_mask=key_padding_mask, device=q.device, dtype=q.dtype)
        is_causal = False
    empty = _empty_rows(mask)
    if empty is not None:  # let the empty rows see every key, then zero them: no NaN forward or backward
        mask = mask | empty if mask.dtype == torch.bool else mask.masked_fill(empty, 0.0)
    gqa = sizes.kv_heads != sizes.heads
    # None on the CPU (and for impl="sdpa"): SDPA's own dispatch
    backend = choose_backend(q, k, v, is_causal=is_causal, attn_mask=mask) if choose else None
    try:
        out = sdpa_with_backend(backend, q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                enable_gqa=gqa)
    except RuntimeError as error:
        if backend is None:
            raise
        record_refusal(q, k, v, is_causal=is_causal, attn_mask=mask, backend=backend, error=error)
        out = sdpa_with_backend(None, q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      scale: float | None = None, attn_mask: torch.Tensor | None = None,
                      key_padding_mask: torch.Tensor | None = None,
                      impl: Literal["auto", "reference", "sdpa"] = "auto") -> torch.Tensor:
    """Scaled dot-product softmax attention, ``softmax(Q K^T * scale + mask) V``.

    Vaswani et al., "Attention Is All You Need", arXiv 1706.03762, eq. 1.

    Args:
        q: queries ``[B, H, N, D]``.
        k: keys ``[B, H_kv, M, D]``; ``H_kv`` divides ``H`` (grouped / multi-query attention:
            query head ``h`` uses key/value head ``h // (H // H_kv)``).
        v: values ``[B, H_kv, M, Dv]``.
        causal: query ``i`` sees keys ``j <= i + M - N`` (queries aligned to the END of the keys,
            as when decoding with a cache; ``N > M`` is an error).
        scale: multiplies the scores; default ``D ** -0.5``.
        attn_mask: boolean (True = may attend) or additive float, broadcastable to ``[B, H, N, M]``.
        key_padding_mask: boolean ``[B, M]``, True = real token.
        impl: "reference" (explicit float32/float64 softmax), "sdpa"
            (``torch.nn.functional.scaled_dot_product_attention``, its own backend choice) or "auto"
            (SDPA; on a CUDA device with the backend measured fastest for this device, dtype, head dim
            and mask kind, see :func:`attnlab.ops.softmax_backend_report`; on the CPU, SDPA's own
            dispatch).

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q. A query row that may attend to no key returns zeros.
    """
    check_impl(impl, IMPLS)
    if impl == "reference":
        return softmax_attention_reference(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask,
                                           key_padding_mask=key_padding_mask)
    sizes = check_qkv(q, k, v)
    scale = check_scale(scale, sizes.head_dim)
    _check_masks(sizes, attn_mask, key_padding_mask, q.device)
    if causal:
        check_causal_lengths(sizes.length, sizes.key_length)
    return _sdpa(q, k, v, sizes, causal=causal, scale=scale, attn_mask=attn_mask,
                 key_padding_mask=key_padding_mask, choose=impl == "auto")


register(Mechanism(
    name="softmax",
    op=softmax_attention,
    reference=softmax_attention_reference,
    layer=None,
    family="softmax",
    paper="Attention Is All You Need",
    arxiv="1706.03762",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=True,
    supports_gqa=True,
    complexity="O(N^2 d)",
    defaults={"scale": None, "attn_mask": None, "key_padding_mask": None, "impl": "auto"},
    impls=("sdpa",),
    check=CheckConfig(),
))
