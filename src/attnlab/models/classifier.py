"""``SequenceClassifier``: a small encoder (bidirectional by default) with any registered mixer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnlab.models.blocks import BlockStack, ModelSizes
from attnlab.nn.short_conv import ShortConvLayers

__all__ = ["SequenceClassifier", "POOLINGS"]

POOLINGS = ("mean", "last", "none")


class SequenceClassifier(ModelSizes, nn.Module):
    """Embedding + (optional) learned positions + ``depth`` pre-norm blocks + a linear read-out.

    Inputs are tokens ``[B, N]`` (``vocab_size=``) or feature vectors ``[B, N, input_dim]``
    (``input_dim=``). ``pooling="mean"`` gives ``[B, num_classes]`` from the mean over positions,
    ``"last"`` reads the last position (with ``causal=True`` it has seen the whole sequence), and
    ``"none"`` gives per-position outputs ``[B, N, num_classes]`` (token labelling, e.g. match3).

    The encoder is bidirectional (``causal=False``); a causal-only mechanism is refused with the
    reason unless ``causal=True`` is asked for.

    Args:
        num_classes: outputs per read-out (1 for regression).
        dim, depth, heads: sizes.
        mechanism: a registered mechanism name.
        max_len: longest sequence (learned positions; ignored with ``positions=False``).
        vocab_size / input_dim: exactly one of them.
        pooling: "mean", "last" or "none".
        causal: causal masking in the mixers.
        mlp_ratio: MLP width multiple (0: attention-only blocks). norm: layer norms on/off.
        positions: add learned position embeddings.
        short_conv: kernel of a gated short convolution before the mixer (0: none), the same whatever
            the mechanism (:class:`attnlab.nn.short_conv.ShortConvolution`): centred (odd kernel, it sees
            ``K // 2`` tokens on each side) in the bidirectional encoder, causal with ``causal=True``.
        short_conv_layers: the blocks that get it: "all", "first" or a tuple of block indices.
        **mechanism_options: options of the mechanism's op or layer.
    """

    def __init__(self, num_classes: int, dim: int, depth: int, heads: int, *, mechanism: str = "softmax",
                 max_len: int, vocab_size: int | None = None, input_dim: int | None = None,
                 pooling: str = "mean", causal: bool = False, mlp_ratio: int = 4, norm: bool = True,
                 positions: bool = True, short_conv: int = 0, short_conv_layers: ShortConvLayers = "all",
                 **mechanism_options: Any) -> None:
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError(f"give exactly one of vocab_size= and input_dim= (got {vocab_size}, {input_dim})")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be positive")
        self.pooling, self.max_len = pooling, max_len
        self.embed = nn.Embedding(vocab_size, dim) if vocab_size is not None else nn.Linear(input_dim, dim)
        self.position = nn.Embedding(max_len, dim) if positions else None
        self.trunk = BlockStack(dim, depth, heads, mechanism=mechanism, causal=causal, mlp_ratio=mlp_ratio,
                                norm=norm, seq_len=max_len, short_conv=short_conv,
                                short_conv_layers=short_conv_layers, **mechanism_options)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.embed(inputs)  # (B, N, dim)
        n = x.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} is longer than max_len={self.max_len}")
        if self.position is not None:
            x = x + self.position(torch.arange(n, device=x.device))
        x = self.trunk(x)  # (B, N, dim)
        if self.pooling == "mean":
            x = x.mean(dim=1)  # (B, dim)
        elif self.pooling == "last":
            x = x[:, -1]  # (B, dim)
        return self.head(x)
