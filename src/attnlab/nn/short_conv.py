"""``ShortConvolution``: the gated depthwise short convolution that sub-quadratic models put beside their mixer.

"Zoology: Measuring and Improving Recall in Efficient Language Models" (Arora et al., arXiv 2312.04927:
the ``BaseConv`` layer), and "Simple linear attention language models balance the recall-throughput
tradeoff" (Based, Arora et al., arXiv 2402.18668), whose models put a short convolution before linear
attention to solve associative recall.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["ShortConvolution", "ShortConvLayers", "short_conv_layer_indices"]

ShortConvLayers = Literal["all", "first"] | tuple[int, ...]


class ShortConvolution(nn.Module):
    """``y = conv_K(u) * (W u + b) + u``: a depthwise convolution of kernel ``K``, gated by a linear map of
    the same input, plus the input (zoology's ``BaseConv`` with a short kernel, arXiv 2312.04927).

    ``u [B, N, dim] -> y [B, N, dim]``; ``conv_K`` has one length-``K`` filter (and a bias) per channel.
    ``causal=True``: output ``t`` sees inputs ``t-K+1 .. t`` (left zero padding); ``causal=False`` (the
    bidirectional encoders): a centred kernel, ``t-K//2 .. t+K//2``, so ``K`` must be odd.

    Why this form: it is the one zoology and Based train on MQAR (a kernel-3 ``BaseConv`` in front of
    the attention layer), and the gate makes the layer multiply a token's features with its neighbours'
    (the product "previous token x current token" that binds each value to its key); the residual keeps
    the token itself. The alternative, flash-linear-attention's ``ShortConvolution`` (a SiLU-activated
    convolution on the q, k and v projections inside the mixer), needs each mechanism's own layer to
    take it; this form sits in front of any mixer unchanged, so every mechanism gets the same one.

    Decoding: :meth:`step` takes one token and a state of the last ``K - 1`` inputs ``[B, K-1, dim]``;
    N steps equal the full pass (causal only).

    >>> conv = ShortConvolution(8, 3)
    >>> conv(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, dim: int, kernel_size: int, *, causal: bool = True) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got dim={dim!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive integer (e.g. 3), got kernel_size={kernel_size!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if not causal and kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd for a centred (causal=False) convolution; "
                             f"use {kernel_size - 1} or {kernel_size + 1}")
        self.dim, self.kernel_size, self.causal = dim, kernel_size, causal
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim)  # weight (dim, 1, K), bias (dim,)
        self.projection = nn.Linear(dim, dim)

    @property
    def state_size(self) -> int:
        """Floats per sequence the convolution holds besides the current token: the last ``K - 1`` inputs."""
        return (self.kernel_size - 1) * self.dim

    def _check(self, u: torch.Tensor) -> None:
        if u.ndim != 3 or u.shape[-1] != self.dim:
            raise ValueError(f"u must have shape [B, N, dim={self.dim}], got {tuple(u.shape)}")

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, N, dim)
        self._check(u)
        K = self.kernel_size
        pad = (K - 1, 0) if self.causal else (K // 2, K // 2)
        x = F.pad(rearrange(u, "b n d -> b d n"), pad)  # (B, dim, N + K - 1)
        conv = rearrange(self.conv(x), "b d n -> b n d")  # (B, N, dim)
        return conv * self.projection(u) + u

    def step(self, u: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: ``u [B, 1, dim]`` and the last ``K - 1`` inputs ``state [B, K-1, dim]`` (``None``: zeros,
        the start of a sequence) -> ``(y [B, 1, dim], new state)``. Causal convolutions only."""
        if not self.causal:
            raise NotImplementedError("a centred (causal=False) convolution reads future tokens: it has no step")
        self._check(u)
        if u.shape[1] != 1:
            raise ValueError(f"step takes one token: u must be [B, 1, {self.dim}], got {tuple(u.shape)}")
        K = self.kernel_size
        expected = (u.shape[0], K - 1, self.dim)
        if state is None:
            state = u.new_zeros(expected)
        elif not isinstance(state, torch.Tensor) or tuple(state.shape) != expected:
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must be the last K-1 inputs [B, K-1, dim] = {list(expected)}, got {got}")
        window = torch.cat([state.to(u.dtype), u], dim=1)  # (B, K, dim): oldest first, as the filter expects
        conv = torch.einsum("bkd,dk->bd", window, self.conv.weight[:, 0]) + self.conv.bias  # (B, dim)
        y = conv[:, None] * self.projection(u) + u  # (B, 1, dim)
        return y, window[:, 1:]


def short_conv_layer_indices(layers: ShortConvLayers, depth: int) -> tuple[int, ...]:
    """The block indices that get a convolution: "all", "first" (block 0, zoology's MQAR placement) or a
    tuple of indices in ``0 .. depth-1``."""
    if layers == "all":
        return tuple(range(depth))
    if layers == "first":
        return (0,)
    if isinstance(layers, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"short_conv_layers={layers!r} must be distinct block indices in 0..{depth - 1}")
        return tuple(sorted(layers))
    raise ValueError(f"short_conv_layers must be 'all', 'first' or a tuple of block indices, got {layers!r}")
