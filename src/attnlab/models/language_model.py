"""``LanguageModel``: a small decoder (causal) whose mixer is any registered mechanism."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnlab.models.blocks import BlockStack, ModelSizes
from attnlab.nn.attention import Attention
from attnlab.nn.short_conv import ShortConvLayers

__all__ = ["LanguageModel"]


class LanguageModel(ModelSizes, nn.Module):
    """Token embedding + learned positions + ``depth`` pre-norm causal blocks + a linear head.

    ``tokens [B, N] (int64) -> logits [B, N, vocab_size]``. Only the mixer depends on ``mechanism``;
    a mechanism without a causal form (or whose role is not "mixer") is refused with the reason
    (:class:`attnlab.models.MechanismMismatch`).

    Initialisation: PyTorch's ``N(0, 1)`` embeddings and an untied read-out by default;
    ``init_std=0.02, tie_embeddings=True`` is zoology's and GPT-2's language-model recipe. Which one
    learns depends on the task: on MQAR with vocabulary 8192 (2 layers, width 64, one head) the
    zoology recipe reached 0.997 accuracy in 2500 steps while the default stayed at loss 8.34 (no
    recall) for 1000 steps; on MQAR with vocabulary 128 it is the other way round (docs/quality.md).

    Args:
        vocab_size, dim, depth, heads: sizes.
        mechanism: a registered mechanism name.
        max_len: longest sequence (learned position embeddings).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        init_std: standard deviation of the token and position embeddings at initialisation
            (``None``: PyTorch's default, 1).
        tie_embeddings: use the token embedding as the read-out weight.
        short_conv: kernel of a gated causal short convolution before the mixer (0: none; zoology and
            Based use 3), :class:`attnlab.nn.short_conv.ShortConvolution`, the same whatever the mechanism.
        short_conv_layers: the blocks that get it: "all", "first" (zoology's MQAR models) or a tuple of
            block indices.
        context_parallel_group: a ``torch.distributed`` process group whose ranks each hold a shard of every
            sequence (``tokens [B, n]``, :func:`attnlab.distributed.shard_sequence` with ``dim=1``); positions
            are the shard's global ones and every mixer runs through
            :func:`attnlab.distributed.context_parallel_attention`. ``None``: the whole sequence is here.
        context_parallel_layout: "contiguous" or "zigzag" (how ``shard_sequence`` split the tokens).
        **mechanism_options: options of the mechanism's op or layer.

    >>> model = LanguageModel(256, 32, 2, 4, mechanism="softmax", max_len=64)
    >>> model(torch.randint(256, (2, 10))).shape
    torch.Size([2, 10, 256])
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, *, mechanism: str = "softmax",
                 max_len: int, mlp_ratio: int = 4, init_std: float | None = None, tie_embeddings: bool = False,
                 short_conv: int = 0, short_conv_layers: ShortConvLayers = "all",
                 context_parallel_group: Any = None, context_parallel_layout: str = "contiguous",
                 **mechanism_options: Any) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} must be at least 2")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be positive")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        self.trunk = BlockStack(dim, depth, heads, mechanism=mechanism, causal=True, mlp_ratio=mlp_ratio,
                                seq_len=max_len, short_conv=short_conv, short_conv_layers=short_conv_layers,
                                **mechanism_options)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if init_std is not None:
            if not init_std > 0:
                raise ValueError(f"init_std={init_std} must be positive")
            nn.init.normal_(self.embed.weight, std=init_std)
            nn.init.normal_(self.position.weight, std=init_std)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.context_parallel_group, self.context_parallel_layout = None, "contiguous"
        self.set_context_parallel(context_parallel_group, layout=context_parallel_layout)

    def set_context_parallel(self, group: Any, *, layout: str = "contiguous") -> None:
        """Run on sequence shards over the ``torch.distributed`` ``group`` from now on (``None``: whole
        sequences again, e.g. to evaluate after a sharded training run). See ``context_parallel_group``."""
        if group is not None:
            if any(getattr(block, "short_conv", None) is not None for block in self.trunk.blocks):
                raise ValueError("context_parallel_group: the short convolution reads tokens of the previous shard; "
                                 "use short_conv=0 with a sharded sequence")
            for block in self.trunk.blocks:
                if not isinstance(block.mixer, Attention):
                    raise ValueError(f"context_parallel_group needs mixers that are attnlab.nn.Attention (a functional "
                                     f"op); mechanism {self.trunk.mechanism!r} has its own layer")
        for block in self.trunk.blocks:
            if isinstance(block.mixer, Attention):
                block.mixer.context_parallel_group, block.mixer.context_parallel_layout = group, layout
        self.context_parallel_group, self.context_parallel_layout = group, layout

    def forward(self, tokens: torch.Tensor, *, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, N, vocab_size]``, or ``[K, vocab_size]`` at the ``K`` positions where the boolean
        ``select [B, N]`` is True (the read-out, often the largest layer, then runs on those only)."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [B, N], got {tuple(tokens.shape)} {tokens.dtype}")
        n = tokens.shape[1]
        positions = torch.arange(n, device=tokens.device)  # (N,)
        if self.context_parallel_group is not None:  # this rank's shard: its tokens' global positions
            from attnlab.distributed import shard_positions

            positions = shard_positions(n, group=self.context_parallel_group, layout=self.context_parallel_layout,
                                        device=tokens.device)
            n = int(positions.max()) + 1 if n else 0  # the whole sequence's length
        if n > self.max_len:
            raise ValueError(f"sequence length {n} is longer than max_len={self.max_len}")
        x = self.embed(tokens) + self.position(positions)  # (B, N, dim)
        h = self.trunk(x)  # (B, N, dim)
        if select is not None:
            if select.dtype != torch.bool or select.shape != tokens.shape:
                raise ValueError(f"select must be a boolean tensor of the tokens' shape {tuple(tokens.shape)}, got "
                                 f"{select.dtype} {tuple(select.shape)}")
            h = h[select]  # (K, dim)
        return self.head(h)  # (B, N, vocab) or (K, vocab)
