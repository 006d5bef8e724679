"""Shared pieces of every model: the mixer factory, the pre-norm block and the block stack.

Everything except the mixer (embeddings, pre-norm, MLP, read-out) is identical across mechanisms so
that a comparison measures the mechanism and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnlab.nn.attention import Attention
from attnlab.nn.short_conv import ShortConvLayers, ShortConvolution, short_conv_layer_indices
from attnlab.ops.linear import feature_count
from attnlab.registry import Mechanism, get

__all__ = ["MechanismMismatch", "mixer_refusal", "check_mixer", "build_mixer", "mixer_state_size",
           "Block", "BlockStack", "ModelSizes", "count_parameters"]


class MechanismMismatch(ValueError):
    """A registered mechanism that cannot serve as the mixer of the requested model."""


def mixer_refusal(mechanism: str | Mechanism, *, causal: bool) -> str | None:
    """Why ``mechanism`` cannot be the self-attention mixer of a model with this masking, or ``None``.

    Unknown names raise ``KeyError`` (with the closest registered names).
    """
    record = get(mechanism) if isinstance(mechanism, str) else mechanism
    if record.role != "mixer":
        return (f"mechanism {record.name!r} has role {record.role!r}; models take self-attention mixers "
                f"(role 'mixer') only")
    if causal and not record.supports_causal:
        return f"mechanism {record.name!r} defines no causal form, and this model is causal (a decoder)"
    if not causal and not record.supports_bidirectional:
        return (f"mechanism {record.name!r} is causal only, and this model needs bidirectional attention "
                f"(an encoder)")
    return None


def check_mixer(mechanism: str | Mechanism, *, causal: bool) -> Mechanism:
    """The record of ``mechanism``; raises :class:`MechanismMismatch` with the reason when it does not fit."""
    record = get(mechanism) if isinstance(mechanism, str) else mechanism
    reason = mixer_refusal(record, causal=causal)
    if reason is not None:
        raise MechanismMismatch(reason)
    return record


def build_mixer(mechanism: str, dim: int, heads: int, *, causal: bool, seq_len: int | None = None,
                **options: Any) -> nn.Module:
    """The mixer ``x [B, N, dim] -> [B, N, dim]`` of ``mechanism``.

    Ops go through :class:`attnlab.nn.Attention` (q/k/v/out projections around the op); mechanisms
    that register their own layer (role "mixer") are built as ``layer(dim, heads, causal=..., **options)``.
    The record's ``model_options(seq_len)`` (a window of a quarter of the length, a layer's fixed length)
    come first; ``options`` override them.
    """
    record = check_mixer(mechanism, causal=causal)
    options = {**record.options_for_model(seq_len), **options}
    if record.layer is not None:
        return record.layer(dim, heads, causal=causal, **options)
    return Attention(dim, heads, mechanism=record.name, causal=causal, **options)


def mixer_state_size(mechanism: str, *, heads: int, head_dim: int, depth: int,
                     options: dict[str, Any] | None = None) -> int | None:
    """Floats of recurrent state per sequence over ``depth`` layers, where the mechanism defines it.

    ``options`` are the mixer's: a ``feature_dim`` narrows the keys, and a ``feature_map`` (the
    mechanism's default one when not given) makes the key side of the state its number of features
    (``1 + f + f^2`` for "taylor").
    """
    record = get(mechanism)
    if record.state_size is None:
        return None
    options = options or {}
    key_dim = options.get("feature_dim") or head_dim
    feature_map = options.get("feature_map", record.defaults.get("feature_map"))
    if feature_map is not None:
        key_dim = feature_count(feature_map, key_dim)
    return depth * int(record.state_size(heads, key_dim, head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``.

    ``mlp_ratio=0`` drops the MLP; ``norm=False`` drops the layer norms (the attention-only model of
    the in-context regression task). ``short_conv`` (a :class:`attnlab.nn.short_conv.ShortConvolution`)
    adds a sub-layer before the mixer, ``x + short_conv(norm(x))``, the way zoology's blocks hold its
    ``BaseConv`` sequence mixer (arXiv 2312.04927); ``None`` builds nothing (the plain block).
    """

    def __init__(self, mixer: nn.Module, dim: int, *, mlp_ratio: int = 4, norm: bool = True,
                 short_conv: ShortConvolution | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if norm else nn.Identity()
        self.mixer = mixer
        self.mlp: nn.Module | None = None
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim) if norm else nn.Identity()
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.short_conv = short_conv
        if short_conv is not None:  # without one the block has the same parameters (and random draws) as before
            self.norm_conv = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, N, dim)
        if self.short_conv is not None:
            x = x + self.short_conv(self.norm_conv(x))
        x = x + self.mixer(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class BlockStack(nn.Module):
    """``depth`` blocks with the mixer of ``mechanism`` and a final norm; the common trunk of all models.

    Attributes:
        mechanism, causal, heads, depth: what the stack was built with.
        mixer_options: the options the mixers were built with (the record's model options at ``seq_len``,
            overridden by the given ones).
        seq_len: the sequence length the model runs at, for mechanisms that need it at build time.
        short_conv, short_conv_layers: the kernel of the short convolutions (0: none) and the indices of
            the blocks that have one (from "all", "first" or a tuple; see
            :func:`attnlab.nn.short_conv.short_conv_layer_indices`); causal when the stack is, centred
            (odd kernel) otherwise. ``short_conv=0`` builds exactly the stack without them.
        state_size: floats of recurrent state per sequence (all layers, the convolutions' last ``K - 1``
            inputs included), or ``None`` where the mechanism does not define one.
    """

    def __init__(self, dim: int, depth: int, heads: int, *, mechanism: str, causal: bool, mlp_ratio: int = 4,
                 norm: bool = True, seq_len: int | None = None, short_conv: int = 0,
                 short_conv_layers: ShortConvLayers = "all", **mechanism_options: Any) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth} must be at least 1")
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        if isinstance(short_conv, bool) or not isinstance(short_conv, int) or short_conv < 0:
            raise ValueError(f"short_conv must be a kernel size >= 0 (0: no convolution, e.g. 3), got {short_conv!r}")
        if short_conv and not causal and short_conv % 2 == 0:
            raise ValueError(f"short_conv={short_conv} must be odd in a bidirectional model (a centred kernel); "
                             f"use {short_conv - 1} or {short_conv + 1}")
        conv_layers = short_conv_layer_indices(short_conv_layers, depth) if short_conv else ()
        self.mechanism, self.causal, self.heads, self.depth = mechanism, causal, heads, depth
        self.short_conv, self.short_conv_layers = short_conv, conv_layers
        self.blocks = nn.ModuleList(
            Block(build_mixer(mechanism, dim, heads, causal=causal, seq_len=seq_len, **mechanism_options), dim,
                  mlp_ratio=mlp_ratio, norm=norm,
                  short_conv=ShortConvolution(dim, short_conv, causal=causal) if i in conv_layers else None)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.mixer_options = {**get(mechanism).options_for_model(seq_len), **mechanism_options}
        self.state_size = mixer_state_size(mechanism, heads=heads, head_dim=dim // heads, depth=depth,
                                           options=self.mixer_options)
        if self.state_size is not None:
            self.state_size += sum(b.short_conv.state_size for b in self.blocks if b.short_conv is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ModelSizes:
    """``num_parameters`` and ``state_size`` of a model whose blocks are the :class:`BlockStack` ``trunk``."""

    trunk: BlockStack

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)  # type: ignore[arg-type]

    @property
    def state_size(self) -> int | None:
        """Floats of recurrent state per sequence (all layers), where the mechanism defines it."""
        return self.trunk.state_size
