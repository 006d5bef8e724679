"""``LanguageModel``: a small decoder (causal) whose mixer is any registered mechanism."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnlab.models.blocks import BlockStack, ModelSizes

__all__ = ["LanguageModel"]


class LanguageModel(ModelSizes, nn.Module):
    """Token embedding + learned positions + ``depth`` pre-norm causal blocks + a linear head.

    ``tokens [B, N] (int64) -> logits [B, N, vocab_size]``. Only the mixer depends on ``mechanism``;
    a mechanism without a causal form (or whose role is not "mixer") is refused with the reason
    (:class:`attnlab.models.MechanismMismatch`).

    Args:
        vocab_size, dim, depth, heads: sizes.
        mechanism: a registered mechanism name.
        max_len: longest sequence (learned position embeddings).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        **mechanism_options: options of the mechanism's op or layer.

    >>> model = LanguageModel(256, 32, 2, 4, mechanism="softmax", max_len=64)
    >>> model(torch.randint(256, (2, 10))).shape
    torch.Size([2, 10, 256])
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, *, mechanism: str = "softmax",
                 max_len: int, mlp_ratio: int = 4, **mechanism_options: Any) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} must be at least 2")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be positive")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        self.trunk = BlockStack(dim, depth, heads, mechanism=mechanism, causal=True, mlp_ratio=mlp_ratio,
                                seq_len=max_len, **mechanism_options)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [B, N], got {tuple(tokens.shape)} {tokens.dtype}")
        n = tokens.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} is longer than max_len={self.max_len}")
        x = self.embed(tokens) + self.position(torch.arange(n, device=tokens.device))  # (B, N, dim)
        return self.head(self.trunk(x))  # (B, N, vocab)
