"""``Attention``: q/k/v/out projections around any registered functional op."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from attnlab.ops.softmax import TensorHook, softmax_attention_hooked
from attnlab.registry import get

__all__ = ["Attention", "AttentionHooks", "HookFn", "apply_hook", "chain_hooks"]

HookFn = Callable[[torch.Tensor, int], "torch.Tensor | None"]


@dataclass
class AttentionHooks:
    """Callbacks run inside :class:`Attention` (the hook points of ``docs/analysis.md``); each receives
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


def apply_hook(hook: HookFn | None, tensor: torch.Tensor, layer: int) -> torch.Tensor:
    """``hook(tensor, layer)``: the tensor it returns (same shape), or ``tensor`` when it returns ``None``."""
    if hook is None:
        return tensor
    result = hook(tensor, layer)
    if result is None:
        return tensor
    if not isinstance(result, torch.Tensor) or result.shape != tensor.shape:
        raise ValueError(f"a hook must return None or a tensor of shape {tuple(tensor.shape)}, got "
                         f"{getattr(result, 'shape', type(result).__name__)}")
    return result


def chain_hooks(hooks: Sequence[tuple[HookFn | None, int]]) -> TensorHook | None:
    """One ``f(tensor) -> tensor`` running the ``(hook, layer)`` pairs in order; ``None`` if all are ``None``."""
    active = [(hook, layer) for hook, layer in hooks if hook is not None]
    if not active:
        return None

    def run(tensor: torch.Tensor) -> torch.Tensor:
        for hook, layer in active:
            tensor = apply_hook(hook, tensor, layer)
        return tensor

    return run


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
        feature_dim: width of each head's queries and keys (default ``dim // heads``; values keep
            ``dim // heads``). Based projects q and k to 16 before its Taylor feature map (Arora et al.,
            "Simple linear attention language models balance the recall-throughput tradeoff",
            arXiv 2402.18668): ``Attention(64, 1, mechanism="linear", feature_map="taylor", feature_dim=16)``.
        context_parallel_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all ranks) whose ranks each hold a shard of the sequence: ``x`` is this rank's shard
            ``[B, n, dim]`` and the op runs through :func:`attnlab.distributed.context_parallel_attention`
            (strategy "auto"); ``None`` (default): the whole sequence is here.
        context_parallel_layout: how the sequence is split, "contiguous" or "zigzag"
            (:func:`attnlab.distributed.shard_sequence`).
        **mechanism_options: keyword options of the op (``decay=``, ``kernel_size=``, ...).
    """

    def __init__(self, dim: int, heads: int, *, mechanism: str = "softmax", kv_heads: int | None = None,
                 causal: bool = False, bias: bool = False, feature_dim: int | None = None,
                 context_parallel_group: Any = None, context_parallel_layout: str = "contiguous",
                 **mechanism_options: Any) -> None:
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
        if feature_dim is not None and (isinstance(feature_dim, bool) or not isinstance(feature_dim, int)
                                        or feature_dim < 1):
            raise ValueError(f"feature_dim must be a positive integer (e.g. 16) or None, got {feature_dim!r}")
        self.feature_dim = self.head_dim if feature_dim is None else feature_dim  # query/key width per head
        self.options = dict(mechanism_options)
        self.to_q = nn.Linear(dim, heads * self.feature_dim, bias=bias)
        self.to_kv = nn.Linear(dim, kv_heads * (self.feature_dim + self.head_dim), bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)
        self.hooks: list[AttentionHooks] = []  # analysis hook points; empty = the plain op, no extra cost
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout = context_parallel_layout

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
        q = rearrange(self.to_q(x), "b n (h f) -> b h n f", h=self.heads)  # (B, H, N, f)
        kv = self.to_kv(source)  # (B, M, H_kv * (f + d))
        if self.feature_dim == self.head_dim:
            k, v = rearrange(kv, "b m (two h d) -> two b h m d", two=2, h=self.kv_heads)
        else:
            k_flat, v_flat = kv.split([self.kv_heads * self.feature_dim, self.kv_heads * self.head_dim], dim=-1)
            k = rearrange(k_flat, "b m (h f) -> b h m f", h=self.kv_heads)  # (B, H_kv, M, f)
            v = rearrange(v_flat, "b m (h d) -> b h m d", h=self.kv_heads)  # (B, H_kv, M, d)
        if self.context_parallel_group is not None:
            out = self._context_parallel_forward(q, k, v, options, context is not None)  # (B, H, n, d)
        elif self.hooks:
            out = self._hooked_forward(q, k, v, options)  # (B, H, N, d)
        else:
            out = self.record(q, k, v, causal=self.causal, **options)  # (B, H, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def _context_parallel_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  options: dict[str, Any], cross: bool) -> torch.Tensor:
        """The op on a sequence sharded over ``context_parallel_group`` (self-attention, no hooks)."""
        if cross or self.hooks or "key_padding_mask" in options:
            raise ValueError("context_parallel_group runs sharded self-attention: context=, key_padding_mask= "
                             "and analysis hooks are not supported with it")
        from attnlab.distributed import context_parallel_attention

        return context_parallel_attention(q, k, v, mechanism=self.record.name, group=self.context_parallel_group,
                                          layout=self.context_parallel_layout, causal=self.causal, **options)

    def _hooked_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        options: dict[str, Any]) -> torch.Tensor:
        """The op with the hook points of ``self.hooks`` (in order). For the softmax mechanism and
        score/probability hooks, :func:`attnlab.ops.softmax.softmax_attention_hooked` computes the
        probabilities explicitly (the reference's own function: fully masked rows give zeros);
        otherwise the registered op runs between the query and the head-output hooks."""
        for hooks in self.hooks:
            q = apply_hook(hooks.on_query, q, hooks.layer)
        on_scores = chain_hooks([(h.on_scores, h.layer) for h in self.hooks])
        on_probs = chain_hooks([(h.on_probs, h.layer) for h in self.hooks])
        if on_scores is None and on_probs is None:
            out = self.record(q, k, v, causal=self.causal, **options)
        elif self.record.name != "softmax":
            raise NotImplementedError(
                f"mechanism {self.record.name!r} defines no softmax scores/probabilities: on_scores/on_probs "
                f"hooks work only with mechanism='softmax' (on_query/on_head_output work with every mechanism)"
            )
        else:
            out, _ = softmax_attention_hooked(q, k, v, causal=self.causal, scale=options.get("scale"),
                                              attn_mask=options.get("attn_mask"),
                                              key_padding_mask=options.get("key_padding_mask"),
                                              on_scores=on_scores, on_probs=on_probs)  # (B, H, N, d)
        for hooks in self.hooks:
            out = apply_hook(hooks.on_head_output, out, hooks.layer)
        return out
