"""``Attention``: q/k/v/out projections around any registered functional op."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from attnlab.registry import get

__all__ = ["Attention", "AttentionHooks"]

HookFn = Callable[[torch.Tensor, int], "torch.Tensor | None"]


@dataclass
class AttentionHooks:
    """Callbacks run inside :class:`Attention` (analysis spec section 0.2); each receives
    ``(tensor, layer)`` and returns the tensor to use, or ``None`` to leave it unchanged.

    ``on_query``: q ``[B, H, N, d]``; ``on_scores``: the masked pre-softmax scores ``[B, H, N, M]``;
    ``on_probs``: the softmax probabilities ``[B, H, N, M]``; ``on_head_output``: the per-head
    output before the output projection ``[B, H, N, d]``. Scores and probabilities exist only for
    the ``softmax`` mechanism. Installed by ``attnlab.analysis.intervene``/``capture``.
    """

    layer: int
    on_query: HookFn | None = None
    on_scores: HookFn | None = None
    on_probs: HookFn | None = None
    on_head_output: HookFn | None = None


def _apply(hook: HookFn | None, tensor: torch.Tensor, layer: int) -> torch.Tensor:
    if hook is None:
        return tensor
    result = hook(tensor, layer)
    return tensor if result is None else result


class Attention(nn.Module):
    """Multi-head attention layer whose mixing step is any registered mechanism's op.

    ``x [B, N, dim] -> [B, N, dim]``: project to q ``[B, H, N, d]`` and k, v ``[B, H_kv, M, d]``
    (``d = dim // heads``), run ``attnlab.get(mechanism).op`` and project back. Mechanisms that carry
    their own parameters (gates, routers, convolutions) register their own layer class and are
    refused here with the name of that class.

    Args:
        dim: model width, divisible by ``heads``.
        heads: query heads H.
        mechanism: a registered mechanism name ("softmax", "lightning", ...).
        kv_heads: key/value heads H_kv dividing ``heads`` (grouped-query attention); default ``heads``.
        causal: causal masking (self-attention only).
        bias: biases in the projections.
        **mechanism_options: keyword options of the op (``decay=``, ``kernel_size=``, ...).
    """

    def __init__(self, dim: int, heads: int, *, mechanism: str = "softmax", kv_heads: int | None = None,
                 causal: bool = False, bias: bool = False, **mechanism_options: Any) -> None:
        super().__init__()
        record = get(mechanism)
        if record.layer is not None:
            raise ValueError(
                f"mechanism {mechanism!r} has parameters of its own: use attnlab.nn.{record.layer.__name__} "
                f"instead of attnlab.nn.Attention"
            )
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads <= 0 or heads % kv_heads != 0:
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
        if kv_heads != heads and not record.supports_gqa:
            raise ValueError(f"mechanism {mechanism!r} does not support grouped key/value heads (kv_heads={kv_heads})")
        record._check_causal(causal)
        unknown = [o for o in mechanism_options if not record.accepts(o)]
        if unknown:
            raise TypeError(f"mechanism {mechanism!r} has no option(s) {', '.join(unknown)}")
        self.record = record
        self.dim, self.heads, self.kv_heads, self.causal = dim, heads, kv_heads, causal
        self.head_dim = dim // heads
        self.options = dict(mechanism_options)
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)
        self.hooks: list[AttentionHooks] = []  # analysis hook points; empty = the plain op, no extra cost

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, dim]``; ``context [B, M, dim]`` for cross-attention (default ``x``);
        ``key_padding_mask [B, M]`` boolean, True = real token."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, dim={self.dim}], got {tuple(x.shape)}")
        if context is not None:
            if not self.record.supports_cross:
                raise ValueError(f"mechanism {self.record.name!r} does not support cross-attention (context=)")
            if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.dim:
                raise ValueError(
                    f"context must have shape [B={x.shape[0]}, M, dim={self.dim}], got {tuple(context.shape)}"
                )
        options = dict(self.options)
        if key_padding_mask is not None:
            if not self.record.accepts("key_padding_mask"):
                raise ValueError(f"mechanism {self.record.name!r} does not take key_padding_mask")
            options["key_padding_mask"] = key_padding_mask
        source = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, d)
        k, v = rearrange(self.to_kv(source), "b m (two h d) -> two b h m d", two=2, h=self.kv_heads)
        if self.hooks:
            out = self._hooked_forward(q, k, v, options)  # (B, H, N, d)
        else:
            out = self.record(q, k, v, causal=self.causal, **options)  # (B, H, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def _hooked_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        options: dict[str, Any]) -> torch.Tensor:
        """The op with the hook points of ``self.hooks`` (in order). For the softmax mechanism and
        score/probability hooks, the probabilities are computed explicitly (the reference formula
        of ``attnlab.ops.softmax``); otherwise the registered op runs between the query and the
        head-output hooks."""
        for hooks in self.hooks:
            q = _apply(hooks.on_query, q, hooks.layer)
        needs_probs = any(h.on_scores is not None or h.on_probs is not None for h in self.hooks)
        if not needs_probs:
            out = self.record(q, k, v, causal=self.causal, **options)
        elif self.record.name != "softmax":
            raise NotImplementedError(
                f"mechanism {self.record.name!r} defines no softmax scores/probabilities: on_scores/on_probs "
                f"hooks work only with mechanism='softmax' (on_query/on_head_output work with every mechanism)"
            )
        else:
            from attnlab.ops.softmax import attention_mask

            scale = options.get("scale")
            scale = self.head_dim ** -0.5 if scale is None else scale
            dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            kf = k.repeat_interleave(self.heads // self.kv_heads, dim=1).to(dtype)  # (B, H, M, d)
            vf = v.repeat_interleave(self.heads // self.kv_heads, dim=1).to(dtype)  # (B, H, M, d)
            scores = torch.einsum("bhnd,bhmd->bhnm", q.to(dtype), kf) * scale  # (B, H, N, M)
            mask = attention_mask(q.shape[2], k.shape[2], causal=self.causal, attn_mask=options.get("attn_mask"),
                                  key_padding_mask=options.get("key_padding_mask"), device=q.device, dtype=dtype)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            for hooks in self.hooks:
                scores = _apply(hooks.on_scores, scores, hooks.layer)
            probs = torch.softmax(scores, dim=-1)  # (B, H, N, M)
            for hooks in self.hooks:
                probs = _apply(hooks.on_probs, probs, hooks.layer)
            out = torch.einsum("bhnm,bhmd->bhnd", probs, vf).to(q.dtype)  # (B, H, N, d)
        for hooks in self.hooks:
            out = _apply(hooks.on_head_output, out, hooks.layer)
        return out
