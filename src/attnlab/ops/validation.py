"""Input checks shared by every op: shapes, dtypes, devices, scale, impl.

Each check raises ``ValueError`` / ``TypeError`` naming the argument, what it received and what was
expected, so that a user never has to read a broadcasting error from deep inside an einsum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import repeat

__all__ = [
    "Sizes",
    "check_qkv",
    "check_scale",
    "check_impl",
    "check_causal_lengths",
    "check_tensor",
    "expand_kv",
    "compute_dtype",
]


class Sizes(NamedTuple):
    """Sizes read off ``q [B, H, N, D]``, ``k [B, H_kv, M, D]``, ``v [B, H_kv, M, Dv]``."""

    batch: int
    heads: int
    kv_heads: int
    length: int
    key_length: int
    head_dim: int
    value_dim: int


def check_tensor(name: str, x: object, *, ndim: int | None = None, layout: str = "") -> torch.Tensor:
    """``x`` must be a floating tensor (of ``ndim`` dims when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions {layout}, got {x.ndim} (shape {tuple(x.shape)})"
        )
    return x


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, allow_gqa: bool = True,
              allow_cross: bool = True, allow_value_dim: bool = True) -> Sizes:
    """Check ``q [B, H, N, D]``, ``k [B, H_kv, M, D]``, ``v [B, H_kv, M, Dv]`` and return the sizes.

    Args:
        allow_gqa: k, v may have ``H_kv`` heads dividing ``H`` (else ``H_kv == H`` is required).
        allow_cross: ``M != N`` is allowed.
        allow_value_dim: ``Dv != D`` is allowed.
    """
    check_tensor("q", q, ndim=4, layout="[B, H, N, D]")
    check_tensor("k", k, ndim=4, layout="[B, H_kv, M, D]")
    check_tensor("v", v, ndim=4, layout="[B, H_kv, M, Dv]")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, H, N, D = q.shape
    Bk, Hkv, M, Dk = k.shape
    Bv, Hv, Mv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k has B={Bk}, v has B={Bv}")
    if Dk != D:
        raise ValueError(f"k must have the head dim of q (D={D}), got k.shape[-1]={Dk}")
    if Hv != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got k {Hkv} and v {Hv}")
    if Mv != M:
        raise ValueError(f"k and v must have the same length, got k M={M} and v M={Mv}")
    if Hkv != H and not allow_gqa:
        raise ValueError(f"k, v must have the H={H} heads of q (no grouped heads here), got H_kv={Hkv}")
    if H % Hkv != 0:
        raise ValueError(f"H_kv={Hkv} heads of k, v must divide the H={H} heads of q")
    if M != N and not allow_cross:
        raise ValueError(f"k, v must have the length of q (N={N}) here, got M={M}")
    if Dv != D and not allow_value_dim:
        raise ValueError(f"v must have the head dim of q (D={D}) here, got Dv={Dv}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if 0 in x.shape:
            raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")
    return Sizes(B, H, Hkv, N, M, D, Dv)


def check_scale(scale: float | None, head_dim: int) -> float:
    """``scale`` (default ``head_dim ** -0.5``) must be a positive finite number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, torch.Tensor) or not isinstance(scale, int | float):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite number, got scale={scale}")
    return float(scale)


def check_impl(impl: str, valid: Sequence[str]) -> str:
    """``impl`` must be one of ``valid``."""
    if impl not in valid:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(repr(v) for v in valid)}")
    return impl


def check_causal(causal: object, *, causal_only: str | None = None) -> bool:
    """``causal`` must be a bool; a causal-only mechanism (``causal_only`` = its name) refuses False."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (True or False), got causal={causal!r} ({type(causal).__name__})")
    if causal_only is not None and not causal:
        raise NotImplementedError(f"{causal_only} is defined for causal attention only; pass causal=True")
    return causal


def check_causal_lengths(length: int, key_length: int) -> None:
    """Causal attention with queries aligned to the end of the keys needs ``N <= M``."""
    if length > key_length:
        raise ValueError(
            f"causal attention needs at most as many queries as keys (queries are aligned to the end "
            f"of the keys), got N={length} queries and M={key_length} keys"
        )


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat the ``H_kv`` key/value heads of ``x [B, H_kv, M, D]`` to ``heads``.

    Query head ``h`` uses key/value head ``h // (heads // H_kv)`` (as ``repeat_interleave`` gives).
    """
    groups = heads // x.shape[1]
    if groups == 1:
        return x
    return repeat(x, "b hkv m d -> b (hkv g) m d", g=groups)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
