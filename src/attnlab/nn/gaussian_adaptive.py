"""GAAM: Gaussian Adaptive Attention, single- and multi-head, and a sequence-mixer wrapper.

Ioannides et al., "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations
Across Multiple Modalities", arXiv 2401.11143, eq. 1-3 (the Gaussian weighting of standardised
features), transcribed from the reference code (gioannides/Gaussian-Adaptive-Attention,
``gaussian_adaptive_attention/GaussianBlock.py``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.validation import check_causal, check_float, check_int, check_tensor, compute_dtype
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["GaussianAdaptiveAttention", "MultiHeadGaussianAdaptiveAttention", "GaussianAdaptiveMixer",
           "gaussian_adaptive_weights"]

MIXTURES = ("product", "sum")


def gaussian_adaptive_weights(x: torch.Tensor, mean_offsets: torch.Tensor, c: torch.Tensor, *, norm_axis: int,
                              padding_value: float | None = None, eps: float = 1e-8,
                              mixture: Literal["product", "sum"] = "product") -> torch.Tensor:
    """The GAAM weights ``w`` of ``x`` along ``norm_axis`` (same shape as ``x``), in float32/float64.

    GAAM (arXiv 2401.11143), as the reference code computes them: entries equal to ``padding_value``
    are zeroed for the statistics (they still count in the mean and variance),
    ``mu = mean(x)``, ``var = var(x) + eps`` (unbiased), and for ``i = 1..G``
    ``g_i = exp(-((x - (mu + delta_i)) / sqrt(var))^2 / (2 c_i^2)) / sqrt(2 pi c_i^2)``;
    ``w = prod_i g_i`` ("product", the code) or ``sum_i g_i`` ("sum", the paper's mixture reading,
    inferred), then ``w / max(sum_{norm_axis} w, eps)``. The product of many densities can underflow
    to 0 (the code does the same); ``w`` is then 0.
    """
    dtype = compute_dtype(x.dtype)
    xf = x.to(dtype)
    mask = x != padding_value if padding_value is not None else None
    x_masked = torch.where(mask, xf, torch.zeros_like(xf)) if mask is not None else xf
    mean = x_masked.mean(dim=norm_axis, keepdim=True)
    var = x_masked.var(dim=norm_axis, keepdim=True) + eps
    weights: torch.Tensor | float = 1.0 if mixture == "product" else 0.0
    for i in range(mean_offsets.shape[0]):
        delta, ci = mean_offsets[i].to(dtype), c[i].to(dtype)
        y_norm = (xf - (mean + delta)) / torch.sqrt(var)
        gaussian = torch.exp(-(y_norm**2) / (2.0 * ci**2)) / torch.sqrt(2 * math.pi * ci**2)
        weights = weights * gaussian if mixture == "product" else weights + gaussian
    return weights / weights.sum(dim=norm_axis, keepdim=True).clamp(min=eps)


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class GaussianAdaptiveAttention(nn.Module):
    """One GAAM head: reweights ``x`` by learned Gaussians of its standardised values along an axis.

    Ioannides et al., "Gaussian Adaptive Attention is All You Need", arXiv 2401.11143, eq. 1-3, as the
    reference code defines it (see :func:`gaussian_adaptive_weights`): ``y = x * w`` where ``x`` is
    not ``padding_value`` and ``y = x`` where it is. Parameters: mean offsets ``delta`` (``[G]``,
    initialised to ``mean_offset_init``, 0 in the code) and scales ``c = exp(randn(G))``.

    Args (same order as the reference code; ``num_heads`` is unused there too):
        norm_axis: axis of the statistics. num_heads: unused. num_gaussians: G.
        padding_value: entries equal to it are ignored (zeroed) for the statistics and passed through.
        mean_offset_init: initial ``delta``. eps: added to the variance; floor of the normaliser.
        mixture: "product" of the Gaussians (the code, default) or "sum" (the paper's mixture, inferred).

    Shapes: ``x [..., n, ...]`` (at least 2 dims, at least 2 entries along ``norm_axis``) -> same shape.
    ``return_attention_details=True`` also returns the weights ``w`` (detached).
    """

    def __init__(self, norm_axis: int, num_heads: int, num_gaussians: int, padding_value: float | None = None,
                 mean_offset_init: float = 0.0, eps: float = 1e-8, *,
                 mixture: Literal["product", "sum"] = "product") -> None:
        super().__init__()
        if not isinstance(norm_axis, int) or isinstance(norm_axis, bool):
            raise ValueError(f"norm_axis must be an integer, got {norm_axis!r}")
        _check_int("num_heads", num_heads)
        _check_int("num_gaussians", num_gaussians)
        if mixture not in MIXTURES:
            raise ValueError(f"mixture={mixture!r} is not one of {MIXTURES}")
        self.norm_axis, self.num_heads, self.num_gaussians = norm_axis, num_heads, num_gaussians
        self.padding_value, self.eps, self.mixture = padding_value, eps, mixture
        self.mean_offsets = nn.Parameter(torch.full((num_gaussians,), float(mean_offset_init)))
        self.c = nn.Parameter(torch.exp(torch.randn(num_gaussians)))

    def forward(self, x: torch.Tensor, return_attention_details: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = check_tensor("x", x)
        if x.ndim < 2:
            raise ValueError(f"x must have at least 2 dimensions, got {x.ndim} (shape {tuple(x.shape)})")
        if not -x.ndim <= self.norm_axis < x.ndim:
            raise ValueError(f"norm_axis={self.norm_axis} is out of bounds for x with {x.ndim} dimensions")
        if x.shape[self.norm_axis] < 2:
            raise ValueError(f"x needs at least 2 entries along norm_axis={self.norm_axis} for the unbiased "
                             f"variance, got shape {tuple(x.shape)}")
        weights = gaussian_adaptive_weights(x, self.mean_offsets, self.c, norm_axis=self.norm_axis,
                                            padding_value=self.padding_value, eps=self.eps, mixture=self.mixture)
        out = x.to(weights.dtype) * weights
        if self.padding_value is not None:
            out = torch.where(x != self.padding_value, out, x.to(weights.dtype))
        out = out.to(x.dtype)
        return (out, weights.detach()) if return_attention_details else out


class MultiHeadGaussianAdaptiveAttention(nn.Module):
    """GAAM with ``num_heads`` heads: ``norm_axis`` split into contiguous chunks, one head per chunk.

    Ioannides et al., arXiv 2401.11143 (multi-head GAAM), as the reference code defines it: chunk size
    ``n // num_heads``, the last head takes the remainder; each head has its own parameters and
    statistics; the outputs are concatenated back. (The reference passes ``eps`` positionally into the
    unused ``mean_offset_init``, so its heads always use ``eps=1e-8``; here ``eps`` reaches the heads.)

    Shapes: ``x`` with ``x.shape[norm_axis] >= 2 * num_heads`` -> same shape.
    """

    def __init__(self, norm_axis: int, num_heads: int, num_gaussians: int, padding_value: float | None = None,
                 eps: float = 1e-8, *, mixture: Literal["product", "sum"] = "product") -> None:
        super().__init__()
        _check_int("num_heads", num_heads)
        self.norm_axis, self.num_heads = norm_axis, num_heads
        self.attention_heads = nn.ModuleList([
            GaussianAdaptiveAttention(norm_axis, num_heads, num_gaussians, padding_value, eps=eps, mixture=mixture)
            for _ in range(num_heads)
        ])

    def forward(self, x: torch.Tensor, return_attention_details: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = check_tensor("x", x)
        if not -x.ndim <= self.norm_axis < x.ndim:
            raise ValueError(f"norm_axis={self.norm_axis} is out of bounds for x with {x.ndim} dimensions")
        size = x.shape[self.norm_axis]
        chunk = size // self.num_heads
        if chunk < 2:
            raise ValueError(f"x has {size} entries along norm_axis={self.norm_axis}: num_heads={self.num_heads} "
                             f"heads need at least 2 each (shape {tuple(x.shape)})")
        outputs, details = [], []
        for i, head in enumerate(self.attention_heads):
            end = (i + 1) * chunk if i < self.num_heads - 1 else size
            out, weights = head(x.narrow(self.norm_axis, i * chunk, end - i * chunk), return_attention_details=True)
            outputs.append(out)
            details.append(weights)
        out = torch.cat(outputs, dim=self.norm_axis)
        return (out, torch.cat(details, dim=self.norm_axis)) if return_attention_details else out


class GaussianAdaptiveMixer(nn.Module):
    """Multi-head GAAM as a sequence mixer, ``x [B, N, dim] -> [B, N, dim]`` (the registered "gaam" layer).

    Ioannides et al., arXiv 2401.11143. Wraps :class:`MultiHeadGaussianAdaptiveAttention` with
    ``norm_axis`` 1 ("sequence": each head reweights a contiguous chunk of tokens, feature by feature,
    by the statistics of that chunk) or 2 ("feature": each token's features, no mixing across tokens).
    The layer has no projections (G parameters pairs per head). Not causal: the statistics cover the
    whole chunk.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, num_gaussians: int = 5,
                 norm_axis: Literal["sequence", "feature"] = "sequence", mixture: Literal["product", "sum"] = "product",
                 padding_value: float | None = None, eps: float = 1e-8) -> None:
        super().__init__()
        check_int("num_gaussians", num_gaussians, minimum=1)
        check_float("padding_value", padding_value, allow_none=True)
        check_float("eps", eps, minimum=0.0, strict_minimum=True)
        check_causal(causal)
        if causal:
            raise NotImplementedError("GAAM defines no causal form (its statistics cover the whole axis)")
        if norm_axis not in ("sequence", "feature"):
            raise ValueError(f"norm_axis={norm_axis!r} is not 'sequence' or 'feature'")
        self.dim, self.heads = dim, heads
        self.gaam = MultiHeadGaussianAdaptiveAttention(1 if norm_axis == "sequence" else 2, heads, num_gaussians,
                                                       padding_value, eps, mixture=mixture)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gaam(check_sequence("x", x, self.dim))


register(Mechanism(
    name="gaam",
    op=None,
    reference=None,
    layer=GaussianAdaptiveMixer,
    family="similarity",
    paper="Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple "
          "Modalities",
    arxiv="2401.11143",
    supports_causal=False,
    supports_bidirectional=True,
    complexity="O(G N dim)",
    check=CheckConfig(layer_configs=({}, {"mixture": "sum", "num_gaussians": 3}, {"norm_axis": "feature"})),
))
