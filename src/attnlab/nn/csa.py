"""Class Semantics-based Attention (CSA): channel and temporal attention learned from class semantics.

Sridhar et al., "Class Semantics-based Attention for Action Detection", ICCV 2021, arXiv 2109.02613
Only the abstract and a third-party review were available: the formulas below
are inferred and every choice is an option.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.validation import check_int
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["ClassSemanticsAttention"]


class ClassSemanticsAttention(nn.Module):
    """Attention weights learned from class-semantics features ``R`` and applied to encoded features ``F``.

    CSA, arXiv 2109.02613 (formulas inferred). With ``F [B, T, C]`` (the features fed to the
    localisation sub-network, e.g. BMN) and ``R [B, T, C_r]`` (snippet-level features of the
    action-recognition encoder), both time-major here (the paper writes ``C x T``):

        a_c = sigmoid(W2 relu(W1 mean_t(R)))          # (C,)  channel attention, SE-style
        a_t = sigmoid(Conv1d_k(R))                      # (T,)  temporal attention, local context
        out = F ⊙ a_c + F ⊙ a_t                        # fusion="sum"

    The weights come from ``R`` only, along both axes. Inferred parts: the SE form with
    ``reduction`` (16), the temporal kernel size ``kernel_size`` (3, odd, zero padding) and the
    fusion: ``"sum"`` (default, "fuses the two attention-applied outputs") or ``"product"``
    (``F ⊙ a_c ⊙ a_t``).

    Args:
        channels: C, width of ``F``.
        semantic_channels: C_r, width of ``R`` (default C).
        reduction, kernel_size, fusion: see above.
    """

    def __init__(self, channels: int, semantic_channels: int | None = None, *, reduction: int = 16,
                 kernel_size: int = 3, fusion: Literal["sum", "product"] = "sum") -> None:
        super().__init__()
        check_int("semantic_channels", semantic_channels, minimum=1, allow_none=True)
        check_int("reduction", reduction, minimum=1)
        check_int("kernel_size", kernel_size, minimum=1)
        semantic_channels = channels if semantic_channels is None else semantic_channels
        for name, value in (("channels", channels), ("semantic_channels", semantic_channels),
                            ("reduction", reduction), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the output keeps the length T), got kernel_size={kernel_size}")
        if fusion not in ("sum", "product"):
            raise ValueError(f"fusion={fusion!r} is not one of 'sum', 'product'")
        self.channels, self.semantic_channels, self.fusion = channels, semantic_channels, fusion
        hidden = max(1, semantic_channels // reduction)
        self.channel_gate = nn.Sequential(nn.Linear(semantic_channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.temporal_gate = nn.Conv1d(semantic_channels, 1, kernel_size, padding=kernel_size // 2)

    def weights(self, semantics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel weights ``[B, C]`` and temporal weights ``[B, T]`` from ``semantics [B, T, C_r]``."""
        channel = torch.sigmoid(self.channel_gate(semantics.mean(dim=1)))  # (B, C)
        temporal = torch.sigmoid(self.temporal_gate(semantics.transpose(1, 2))).squeeze(1)  # (B, T)
        return channel, temporal

    def forward(self, x: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        """``x = F [B, T, C]``, ``semantics = R [B, T, C_r]`` -> ``[B, T, C]``."""
        x = check_sequence("x", x, self.channels)
        semantics = check_sequence("semantics", semantics, self.semantic_channels)
        if semantics.shape[:2] != x.shape[:2]:
            raise ValueError(f"semantics must have the batch and length of x {list(x.shape[:2])}, got "
                             f"{tuple(semantics.shape)}")
        channel, temporal = self.weights(semantics)
        if self.fusion == "sum":
            return x * channel[:, None, :] + x * temporal[:, :, None]
        return x * channel[:, None, :] * temporal[:, :, None]


def _build(dim: int, heads: int, *, causal: bool = False, **config: object) -> ClassSemanticsAttention:
    if causal:
        raise NotImplementedError("CSA's temporal convolution is centred; it defines no causal form")
    config.setdefault("semantic_channels", dim + 3)
    config.setdefault("reduction", 4)
    return ClassSemanticsAttention(dim, **config)  # type: ignore[arg-type]


def _inputs(layer: ClassSemanticsAttention, *, batch: int, length: int, dim: int, dtype: torch.dtype,
            generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    r = torch.randn(batch, length, layer.semantic_channels, generator=generator, dtype=torch.float64).to(dtype)
    return {"x": x, "semantics": r}, (batch, length, dim)


register(Mechanism(
    name="csa",
    op=None,
    reference=None,
    layer=ClassSemanticsAttention,
    family="cross-attention",
    paper="Class Semantics-based Attention for Action Detection",
    arxiv="2109.02613",
    supports_causal=False,
    supports_bidirectional=True,
    supports_cross=True,
    complexity="O(T C C_r / r + T C_r k)",
    check=CheckConfig(layer_configs=({}, {"fusion": "product", "kernel_size": 5}), layer_build=_build,
                      layer_inputs=_inputs),
    role="cross",
))
