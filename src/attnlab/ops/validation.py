"""Input checks shared by every op: shapes, dtypes, devices, scale, impl.

Each check raises ``ValueError`` / ``TypeError`` naming the argument, what it received and what was
expected, so that a user never has to read a broadcasting error from deep inside an einsum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import repeat

__all__ = [
    "Sizes",
    "check_qkv",
    "check_scale",
    "check_impl",
    "check_causal",
    "check_causal_lengths",
    "check_bool",
    "check_int",
    "check_float",
    "check_choice",
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
    return check_float("scale", scale, minimum=0.0, strict_minimum=True)


def check_impl(impl: str, valid: Sequence[str]) -> str:
    """``impl`` must be one of ``valid``."""
    return check_choice("impl", impl, valid)


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a bool: ``"yes"``, ``None``, ``1`` or a tensor are refused, not read as truthy/falsy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {name}={value!r} ({type(value).__name__})")
    return value


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None,
              why: str = "", allow_none: bool = False) -> int | None:
    """``value`` must be an int (not a bool, not a float such as ``4.0``) within ``[minimum, maximum]``.

    ``why`` (e.g. "NATTEN's rule") is appended to the range error so the user learns where the bound comes from.
    ``allow_none``: ``None`` (an option's "choose for me") passes as ``None``.
    """
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    reason = f" ({why})" if why else ""
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{reason}, got {name}={value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}{reason}, got {name}={value}")
    return int(value)


def check_float(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                strict_minimum: bool = False, allow_none: bool = False) -> float | None:
    """``value`` must be a finite real number (an int or a float, not a bool or a tensor) in range.

    ``strict_minimum``: the minimum itself is refused (``> minimum`` instead of ``>= minimum``).
    ``allow_none``: ``None`` passes as ``None``.
    """
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float, got {name}={value!r} ({type(value).__name__})")
    value = float(value)
    if minimum == 0 and maximum is None:
        wanted = "a positive finite number" if strict_minimum else "a finite number >= 0"
    else:
        bounds = [f"{'>' if strict_minimum else '>='} {minimum}"] if minimum is not None else []
        bounds += [f"<= {maximum}"] if maximum is not None else []
        wanted = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
    below = minimum is not None and (value <= minimum if strict_minimum else value < minimum)
    if not math.isfinite(value) or below or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {wanted}, got {name}={value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` must be one of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(repr(c) for c in choices)}; got {value!r} "
                        f"({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def check_causal(causal: object, *, causal_only: str | None = None) -> bool:
    """``causal`` must be a bool; a causal-only mechanism (``causal_only`` = its name) refuses False."""
    check_bool("causal", causal)
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
