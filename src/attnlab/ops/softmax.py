"""Softmax attention: the baseline every other mechanism is compared with.

"Attention Is All You Need" (Vaswani et al., arXiv 1706.03762), eq. 1:
``Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V``.

:func:`softmax_attention_hooked` is the one explicit form (scores, probabilities, output) with hook
points on the scores and the probabilities. The reference, the hooked path of
:class:`attnlab.nn.Attention` and the analysis dispatcher for Hugging Face models all run it, so a
fully masked row means the same thing everywhere: zeros out, finite gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from attnlab.ops.nonfinite import Reach, guard_nonfinite, mask_reach, standard_reach
from attnlab.ops.softmax_backends import choose_backends, sdpa_with_backends
from attnlab.ops.validation import (
    Sizes,
    check_causal,
    check_causal_lengths,
    check_impl,
    check_qkv,
    check_scale,
    compute_dtype,
    expand_kv,
)
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["softmax_attention", "softmax_attention_reference", "softmax_attention_hooked", "attention_mask",
           "TensorHook"]

# A hook on the scores or probabilities: receives ``[B, H, N, M]``, returns the tensor to use.
TensorHook = Callable[[torch.Tensor], torch.Tensor]

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


def _run_hook(hook: TensorHook | None, tensor: torch.Tensor, name: str) -> torch.Tensor:
    if hook is None:
        return tensor
    result = hook(tensor)
    if not isinstance(result, torch.Tensor) or result.shape != tensor.shape:
        raise ValueError(f"{name} must return a tensor of shape {tuple(tensor.shape)}, got "
                         f"{getattr(result, 'shape', type(result).__name__)}")
    return result


def softmax_attention_hooked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                             scale: float | None = None, attn_mask: torch.Tensor | None = None,
                             key_padding_mask: torch.Tensor | None = None, on_scores: TensorHook | None = None,
                             on_probs: TensorHook | None = None, dropout: float = 0.0,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(Q K^T * scale + mask) V`` step by step, with hook points on the scores and probabilities.

    Vaswani et al., "Attention Is All You Need", arXiv 1706.03762, eq. 1. Computes in float32
    (float64 for float64 inputs) with ``torch.matmul``, the operations of Hugging Face's eager
    attention, so that float32 models give the same bits through this function as through their own.

    Steps: scores ``S = Q K^T * scale`` masked (boolean False -> ``-inf``, additive masks added);
    ``S = on_scores(S)``; a row whose every score is ``-inf`` (all keys masked, by the masks or by
    the hook) is *empty*; ``A = softmax(S)`` with empty rows set to 0; ``A = on_probs(A)``;
    ``O = dropout(A) V``. An empty row therefore outputs zeros (unless ``on_probs`` writes into it)
    and passes finite gradients back, where a plain softmax gives NaN.

    Args:
        q, k, v, causal, scale, attn_mask, key_padding_mask: as in :func:`softmax_attention`.
        on_scores: ``f(S) -> S'`` on the masked scores ``[B, H, N, M]`` (query heads; grouped
            key/value heads are expanded first); ``None`` = no hook.
        on_probs: ``f(A) -> A'`` on the probabilities ``[B, H, N, M]``.
        dropout: dropout on the probabilities used for the output (not on the returned ones).

    Returns:
        ``(out [B, H, N, Dv]`` in the dtype of q, ``probs [B, H, N, M]`` in the compute dtype, as
        returned by ``on_probs``).
    """
    check_causal(causal)
    sizes = check_qkv(q, k, v)
    scale = check_scale(scale, sizes.head_dim)
    _check_masks(sizes, attn_mask, key_padding_mask, q.device)
    if causal:
        check_causal_lengths(sizes.length, sizes.key_length)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got dropout={dropout!r}")
    for name, hook in (("on_scores", on_scores), ("on_probs", on_probs)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be a function f(tensor) -> tensor or None, got {type(hook).__name__}")
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype)  # (B, H, N, D)
    kf = expand_kv(k, sizes.heads).to(dtype)  # (B, H, M, D)
    vf = expand_kv(v, sizes.heads).to(dtype)  # (B, H, M, Dv)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, N, M)
    mask = attention_mask(sizes.length, sizes.key_length, causal=causal, attn_mask=attn_mask,
                          key_padding_mask=key_padding_mask, device=q.device, dtype=dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    scores = _run_hook(on_scores, scores, "on_scores")
    # Decided on the final scores, without a host sync: the masks and the hook both count.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (B, H, N, 1)
    # An empty row gets finite scores (any will do) so that softmax and its backward stay finite,
    # and zero probabilities so that it outputs zeros; torch.where passes no gradient to the other branch.
    probs = torch.softmax(torch.where(empty, 0.0, scores), dim=-1)  # (B, H, N, M)
    probs = torch.where(empty, 0.0, probs)
    probs = _run_hook(on_probs, probs, "on_probs")
    used = F.dropout(probs, p=dropout) if dropout > 0 else probs
    out = torch.matmul(used, vf)  # (B, H, N, Dv)
    return out.to(q.dtype), probs


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                                scale: float | None = None, attn_mask: torch.Tensor | None = None,
                                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(Q K^T * scale + mask) V`` written out, in float32 (float64 for float64 inputs).

    Vaswani et al., "Attention Is All You Need", arXiv 1706.03762, eq. 1. Shapes as in
    :func:`softmax_attention`. The oracle of the conformance suite: :func:`softmax_attention_hooked`
    without hooks.
    """
    check_causal(causal)
    out, _ = softmax_attention_hooked(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask,
                                      key_padding_mask=key_padding_mask)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: Sizes, *, causal: bool, scale: float,
          attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
          choose: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with end-aligned causal masks and zeroed empty rows.

    ``choose``: run the SDPA backends in the order of the fixed rule of
    :func:`attnlab.ops.softmax_backends.softmax_backend_order` (CUDA only); else SDPA's own dispatch.
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
    # () on the CPU and for impl="sdpa": SDPA's own dispatch
    order = choose_backends(q, k, v, is_causal=is_causal, attn_mask=mask) if choose else ()
    out = sdpa_with_backends(order, q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
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
            (SDPA; on a CUDA device its backends are tried in the order of a fixed rule on the
            capability, dtype, head dims, mask kind and the backends enabled, see
            :func:`attnlab.ops.softmax_backends.softmax_backend_order`; nothing is timed; on the CPU,
            SDPA's own dispatch).

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q. A query row that may attend to no key returns zeros.
    """
    check_causal(causal)
    check_impl(impl, IMPLS)
    reach = _softmax_reach(q, k, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    if impl == "reference":
        return guard_nonfinite(lambda k, v: softmax_attention_reference(
            q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, key_padding_mask=key_padding_mask),
            q, k, v, reach=reach)
    sizes = check_qkv(q, k, v)
    scale = check_scale(scale, sizes.head_dim)
    _check_masks(sizes, attn_mask, key_padding_mask, q.device)
    if causal:
        check_causal_lengths(sizes.length, sizes.key_length)
    return guard_nonfinite(lambda k, v: _sdpa(q, k, v, sizes, causal=causal, scale=scale, attn_mask=attn_mask,
                                              key_padding_mask=key_padding_mask, choose=impl == "auto"),
                           q, k, v, reach=reach)


def _softmax_reach(q: torch.Tensor, k: torch.Tensor, *, causal: bool, attn_mask: torch.Tensor | None,
                   key_padding_mask: torch.Tensor | None) -> Reach:
    """The rows that see a key: the causal prefix (or all rows), narrowed by the masks when there are any.

    Called only on validated inputs with a non-finite key (the dense ``[.., N, M]`` mask is built then only).
    """

    def reach(bad: torch.Tensor) -> torch.Tensor:
        N, M = q.shape[2], k.shape[2]
        if attn_mask is None and key_padding_mask is None:
            return standard_reach(causal, N)(bad)
        mask = attention_mask(N, M, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              device=q.device)
        return mask_reach(mask if mask.dtype == torch.bool else mask > float("-inf"))(bad)

    return reach


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
    check=CheckConfig(),
))
