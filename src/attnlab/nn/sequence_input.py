"""Input checks for layers that map a sequence ``x [B, N, dim]``."""

from __future__ import annotations

import torch

from attnlab.ops.validation import check_tensor

__all__ = ["check_sequence", "check_padding_mask"]


def check_sequence(name: str, x: object, dim: int, *, length: int | None = None) -> torch.Tensor:
    """``x`` must be a floating ``[B, N, dim]`` tensor (with ``N == length`` when given)."""
    x = check_tensor(name, x, ndim=3, layout="[B, N, dim]")
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape [B, N, dim={dim}], got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")
    if length is not None and x.shape[1] != length:
        raise ValueError(f"{name} must have the fixed length N={length} this layer was built for, got "
                         f"N={x.shape[1]} (shape {tuple(x.shape)})")
    return x


def check_padding_mask(name: str, mask: object, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``mask`` must be a boolean ``[B, N]`` tensor (True = real token) with a real token in every row."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be boolean (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [B, N] = {[batch, length]}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, x on {device}")
    if not bool(mask.any(dim=-1).all()):
        raise ValueError(f"{name} has a row without any real token (True entry)")
    return mask
