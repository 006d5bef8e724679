"""Dual Cross-Attention Learning (DCAL): global-local and pair-wise cross-attention.

Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object
Re-Identification", CVPR 2022, arXiv 2205.02151.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.softmax import softmax_attention
from attnlab.ops.validation import check_bool, check_float, check_tensor
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["attention_rollout", "GlobalLocalCrossAttention", "GlobalLocalOutput", "PairwiseCrossAttention"]

PAPER = "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification"
ARXIV = "2205.02151"


def attention_rollout(attentions: Sequence[torch.Tensor] | torch.Tensor, *, residual: float = 0.5,
                      renormalize: bool = True) -> torch.Tensor:
    """Accumulated attention ``Ŝ_i = S̄_i S̄_{i-1} ... S̄_1`` with ``S̄ = (1 - residual) mean_h(S) + residual I``.

    DCAL (arXiv 2205.02151, Sec. 3.2, "attention rollout"). ``attentions`` are the row-stochastic
    self-attention maps ``[B, H, N, N]`` of the blocks 1..i (a list, or a tensor ``[L, B, H, N, N]``).
    ``renormalize`` (inferred) divides each row of ``S̄`` by its sum (already 1 for softmax maps).
    Returns ``[B, N, N]``; its CLS row ``[:, 0, 1:]`` gives the patch responses.
    """
    if isinstance(attentions, torch.Tensor):
        attentions = list(attentions)
    if len(attentions) == 0:
        raise ValueError("attentions must hold at least one attention map [B, H, N, N], got none")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got residual={residual}")
    rollout: torch.Tensor | None = None
    for index, attn in enumerate(attentions):
        if not isinstance(attn, torch.Tensor) or attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
            shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
            raise ValueError(f"attentions[{index}] must have shape [B, H, N, N], got {shape}")
        if rollout is not None and attn.shape[-1] != rollout.shape[-1]:
            raise ValueError(f"attentions[{index}] has N={attn.shape[-1]}, the earlier maps N={rollout.shape[-1]}")
        eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
        mixed = (1.0 - residual) * attn.mean(dim=1) + residual * eye  # (B, N, N)
        if renormalize:
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    assert rollout is not None
    return rollout


class _Projections(nn.Module):
    """q, k, v and output projections of a ``dim``-wide, ``heads``-head attention."""

    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, d)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = rearrange(self.to_kv(x), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        return k, v  # (B, H, M, d) each

    def output(self, heads_out: torch.Tensor) -> torch.Tensor:
        return self.to_out(rearrange(heads_out, "b h n d -> b n (h d)"))


class GlobalLocalOutput(NamedTuple):
    """Output of :class:`GlobalLocalCrossAttention`."""

    output: torch.Tensor  # (B, R, dim): the selected (local) queries after attending to all tokens
    indices: torch.Tensor  # (B, R): their positions in x (CLS first when included)


class GlobalLocalCrossAttention(nn.Module):
    """GLCA: the top-R local queries (by CLS attention rollout) attend to all global keys and values.

    DCAL, arXiv 2205.02151, Sec. 3.2: ``f = softmax(Q^l K^{g T} / sqrt(d)) V^g`` where ``Q^l`` are the
    query rows of the ``R`` patches with the highest CLS rollout response and ``K^g, V^g`` all tokens.
    GLCA has its own weights (not shared with self-attention); DCAL uses one GLCA block.

    Args:
        dim, heads: width and heads.
        top_ratio: fraction of patch tokens kept as local queries (R = 10% for FGVC, 30% for Re-ID);
            ``R = max(1, round(top_ratio * (N - 1)))``.
        include_cls: (inferred) the CLS token (position 0) is always a query, placed first.
        bias: biases in the projections.

    ``forward(x [B, N, dim], rollout [B, N, N] or attentions=[[B, H, N, N], ...])`` returns
    :class:`GlobalLocalOutput` (``output [B, R (+1), dim]``, ``indices``). Patches are ordered by
    decreasing response.
    """

    def __init__(self, dim: int, heads: int, *, top_ratio: float = 0.1, include_cls: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        check_float("top_ratio", top_ratio, minimum=0.0, maximum=1.0, strict_minimum=True)
        check_bool("include_cls", include_cls)
        check_bool("bias", bias)
        if not 0.0 < top_ratio <= 1.0:
            raise ValueError(f"top_ratio must be in (0, 1], got top_ratio={top_ratio}")
        self.proj = _Projections(dim, heads, bias)
        self.dim, self.heads = dim, heads
        self.top_ratio, self.include_cls = top_ratio, include_cls

    def select(self, rollout: torch.Tensor) -> torch.Tensor:
        """Positions ``[B, R (+1)]`` of the local queries from the CLS row of ``rollout [B, N, N]``."""
        response = rollout[:, 0, 1:]  # (B, N - 1)
        count = max(1, round(self.top_ratio * response.shape[-1]))
        top = response.topk(count, dim=-1).indices + 1  # (B, R), positions in x
        if self.include_cls:
            top = torch.cat([torch.zeros_like(top[:, :1]), top], dim=-1)
        return top

    def forward(self, x: torch.Tensor, rollout: torch.Tensor | None = None,
                attentions: Sequence[torch.Tensor] | None = None) -> GlobalLocalOutput:
        x = check_sequence("x", x, self.dim)
        B, N, _ = x.shape
        if (rollout is None) == (attentions is None):
            raise ValueError("pass exactly one of rollout [B, N, N] or attentions (a list of [B, H, N, N] maps)")
        if rollout is None:
            rollout = attention_rollout(attentions)  # type: ignore[arg-type]
        check_tensor("rollout", rollout)
        if tuple(rollout.shape) != (B, N, N):
            raise ValueError(f"rollout must have shape [B, N, N] = {[B, N, N]}, got {tuple(rollout.shape)}")
        if N < 2:
            raise ValueError(f"x needs a CLS token and at least one patch token, got N={N}")
        indices = self.select(rollout)  # (B, R)
        local = torch.gather(x, 1, indices[..., None].expand(-1, -1, self.dim))  # (B, R, dim)
        k, v = self.proj.keys_values(x)  # (B, H, N, d)
        out = softmax_attention(self.proj.queries(local), k, v)  # (B, H, R, d)
        return GlobalLocalOutput(self.proj.output(out), indices)


class PairwiseCrossAttention(nn.Module):
    """PWCA: queries of image 1 attend to the keys and values of images 1 and 2 together.

    DCAL, arXiv 2205.02151, Sec. 3.3: ``K_c = [K1; K2]``, ``V_c = [V1; V2]`` and
    ``f = softmax(Q1 K_c^T / sqrt(d)) V_c``. The weights are those of the self-attention branch
    (:meth:`self_attention` uses them on one image); PWCA is used only in training, as a regulariser.

    ``forward(x1 [B, N, dim], x2 [B, M, dim]) -> [B, N, dim]``.
    """

    def __init__(self, dim: int, heads: int, *, bias: bool = True) -> None:
        super().__init__()
        check_bool("bias", bias)
        self.proj = _Projections(dim, heads, bias)
        self.dim, self.heads = dim, heads

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The self-attention branch with the shared weights, ``x [B, N, dim] -> [B, N, dim]``."""
        x = check_sequence("x", x, self.dim)
        k, v = self.proj.keys_values(x)
        return self.proj.output(softmax_attention(self.proj.queries(x), k, v))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = check_sequence("x1", x1, self.dim)
        x2 = check_sequence("x2", x2, self.dim)
        if x2.shape[0] != x1.shape[0]:
            raise ValueError(f"x2 must have the batch size of x1 (B={x1.shape[0]}), got {tuple(x2.shape)}")
        k, v = self.proj.keys_values(torch.cat([x1, x2], dim=1))  # (B, H, N + M, d)
        return self.proj.output(softmax_attention(self.proj.queries(x1), k, v))  # (B, N, dim)


def _glca_inputs(layer: GlobalLocalCrossAttention, *, batch: int, length: int, dim: int, dtype: torch.dtype,
                 generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    maps = torch.randn(2, batch, 2, length, length, generator=generator, dtype=torch.float64).softmax(dim=-1)
    rollout = attention_rollout(maps).to(dtype)  # (B, N, N), batch first
    count = max(1, round(layer.top_ratio * (length - 1))) + int(layer.include_cls)
    return {"x": x, "rollout": rollout}, (batch, count, dim)


def _pwca_inputs(layer: PairwiseCrossAttention, *, batch: int, length: int, dim: int, dtype: torch.dtype,
                 generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    x1 = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    x2 = torch.randn(batch, length + 3, dim, generator=generator, dtype=torch.float64).to(dtype)
    return {"x1": x1, "x2": x2}, (batch, length, dim)


def _bidirectional_build(cls: type[nn.Module]):
    def build(dim: int, heads: int, *, causal: bool = False, **config: object) -> nn.Module:
        if causal:
            raise NotImplementedError(f"{cls.__name__} defines no causal form (DCAL attends over whole images)")
        return cls(dim, heads, **config)

    return build


register(Mechanism(
    name="dcal_glca",
    op=None,
    reference=None,
    layer=GlobalLocalCrossAttention,
    family="cross-attention",
    paper=PAPER,
    arxiv=ARXIV,
    supports_causal=False,
    supports_bidirectional=True,
    supports_cross=True,
    complexity="O(R N d)",
    check=CheckConfig(layer_configs=({"top_ratio": 0.3}, {"top_ratio": 1.0, "include_cls": False}),
                      layer_build=_bidirectional_build(GlobalLocalCrossAttention), layer_inputs=_glca_inputs),
    role="cross",
))

register(Mechanism(
    name="dcal_pwca",
    op=None,
    reference=None,
    layer=PairwiseCrossAttention,
    family="cross-attention",
    paper=PAPER,
    arxiv=ARXIV,
    supports_causal=False,
    supports_bidirectional=True,
    supports_cross=True,
    complexity="O(N (N + M) d)",
    check=CheckConfig(layer_build=_bidirectional_build(PairwiseCrossAttention), layer_inputs=_pwca_inputs),
    role="cross",
))
