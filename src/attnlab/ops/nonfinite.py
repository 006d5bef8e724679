"""Non-finite keys and values: a NaN or Inf reaches exactly the rows that can see it.

A dense masked product lets a non-finite key leak into rows that cannot see it: the masked weight is
0, but ``0 * NaN = NaN`` and ``0 * Inf = NaN`` (and a NaN score plus a ``-inf`` mask is still NaN). A
NaN at key ``t`` of a causal op would then turn the outputs *before* ``t`` into NaN, breaking
causality. Every op runs its computation through :func:`guard_nonfinite`:

- finite inputs (the usual case): one reduction over ``k`` and ``v`` (``O(N D)``) and one host sync,
  then the op's own fast path, untouched;
- otherwise the non-finite key positions are replaced by zeros, the op runs on the cleaned tensors,
  and the rows that can see one of those positions, by the op's own visibility rule (``reach``), are
  set to NaN. Every other row is exactly the result of the op on the cleaned input, which does not
  depend on the replaced positions. A returned recurrent state that has absorbed a non-finite key
  is NaN as well.

A "reach" maps the non-finite key positions ``bad [B, H, M]`` (bool, already expanded to the query
heads) to the rows that see one of them ``[B, H, N]``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from einops import repeat

__all__ = [
    "Reach",
    "nonfinite_positions",
    "guard_nonfinite",
    "guard_nonfinite_sequence",
    "nonfinite_guarded",
    "nonfinite_guarded_forward",
    "causal_reach",
    "global_reach",
    "window_reach",
    "mask_reach",
    "index_reach",
    "standard_reach",
]

Reach = Callable[[torch.Tensor], torch.Tensor]
R = TypeVar("R")


def nonfinite_positions(*tensors: torch.Tensor, position_dim: int = 2) -> torch.Tensor | None:
    """Positions (every dim up to ``position_dim``) holding a NaN/Inf in any of ``tensors``; ``None`` if all finite.

    The common case costs one sum per tensor (a NaN or Inf survives a sum; a finite overflow only sends
    the call to the exact check below, which then finds nothing).
    """
    with torch.no_grad():
        total = sum(x.detach().sum(dtype=torch.float32 if x.dtype != torch.float64 else None) for x in tensors)
        if bool(torch.isfinite(total)):
            return None
        bad = None
        for x in tensors:
            finite = torch.isfinite(x.detach()).flatten(position_dim + 1).all(dim=-1)
            bad = ~finite if bad is None else bad | ~finite
    return bad if bool(bad.any()) else None


def causal_reach(length: int) -> Reach:
    """Queries aligned to the end of the keys: row ``i`` sees keys ``j <= i + M - N`` (the causal prefix)."""

    def reach(bad: torch.Tensor) -> torch.Tensor:
        seen = bad.to(torch.int32).cumsum(dim=-1) > 0  # (B, H, M): a bad key at or before j
        return seen[..., seen.shape[-1] - length:]

    return reach


def global_reach(length: int) -> Reach:
    """Bidirectional attention over all keys: every row sees every key."""

    def reach(bad: torch.Tensor) -> torch.Tensor:
        return bad.any(dim=-1, keepdim=True).expand(*bad.shape[:-1], length)

    return reach


def standard_reach(causal: bool, length: int) -> Reach:
    """:func:`causal_reach` or :func:`global_reach`."""
    return causal_reach(length) if causal else global_reach(length)


def window_reach(before: int, after: int, *, sink_tokens: int = 0) -> Reach:
    """Self-attention where row ``i`` sees keys ``i - before .. i + after`` (and the first ``sink_tokens`` keys
    ``j <= i``)."""

    def reach(bad: torch.Tensor) -> torch.Tensor:
        M = bad.shape[-1]
        counts = torch.nn.functional.pad(bad.to(torch.int32).cumsum(dim=-1), (1, 0))  # (B, H, M + 1)
        i = torch.arange(M, device=bad.device)
        hi = (i + after + 1).clamp(max=M)
        lo = (i - before).clamp(min=0)
        rows = counts[..., hi] - counts[..., lo] > 0
        if sink_tokens:
            rows |= counts[..., (i + 1).clamp(max=min(sink_tokens, M))] > 0
        return rows

    return reach


def mask_reach(allowed: torch.Tensor) -> Reach:
    """Row ``i`` sees key ``j`` where ``allowed [.., N, M]`` (bool, broadcasting to ``[B, H, N, M]``) is True."""

    def reach(bad: torch.Tensor) -> torch.Tensor:
        return (allowed & bad[..., None, :]).any(dim=-1)

    return reach


def index_reach(key_index: torch.Tensor, valid: torch.Tensor) -> Reach:
    """Row ``i`` sees the keys ``key_index [N, K]`` where ``valid [N, K]``."""

    def reach(bad: torch.Tensor) -> torch.Tensor:
        return (bad[..., key_index] & valid).any(dim=-1)

    return reach


def _is_qkv(*tensors: Any) -> bool:
    """Well-formed floating ``[B, H, N, D]`` tensors on one real device (else the op's own checks answer)."""
    if not all(isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 4 and x.numel() > 0
               for x in tensors):
        return False
    q, k, v = tensors
    return (q.device == k.device == v.device and q.device.type != "meta" and k.shape[:3] == v.shape[:3]
            and q.shape[0] == k.shape[0] and q.shape[1] % k.shape[1] == 0)


def _poison(result: Any, rows: torch.Tensor, absorbed: torch.Tensor) -> Any:
    """NaN in the output rows ``rows [B, H, N]``, and in every ``[B, H, ...]`` state tensor where ``absorbed``."""
    if isinstance(result, torch.Tensor):
        return result.masked_fill(rows[..., None], float("nan"))
    if isinstance(result, tuple) and result and isinstance(result[0], torch.Tensor):
        return (_poison(result[0], rows, absorbed), *(_poison_state(s, absorbed) for s in result[1:]))
    return result


def _poison_state(state: Any, absorbed: torch.Tensor) -> Any:
    if isinstance(state, tuple | list):
        return type(state)(_poison_state(s, absorbed) for s in state)
    if (isinstance(state, torch.Tensor) and state.is_floating_point() and state.ndim >= 2
            and tuple(state.shape[:2]) == tuple(absorbed.shape)):
        return state.masked_fill(absorbed.reshape(*absorbed.shape, *([1] * (state.ndim - 2))), float("nan"))
    return state


def guard_nonfinite(run: Callable[[torch.Tensor, torch.Tensor], R], q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, *, causal: bool = False, reach: Reach | None = None) -> R:
    """``run(k, v)``, with a non-finite key or value reaching only the rows that can see it.

    Args:
        run: the op's computation on (possibly cleaned) ``k [B, H_kv, M, D]``, ``v [B, H_kv, M, Dv]``;
            returns ``o [B, H, N, Dv]`` or ``(o, state...)``.
        q: ``[B, H, N, D]`` (for the head count).
        causal, reach: the op's visibility rule (see the module docstring); ``reach=None`` is
            :func:`standard_reach` (the causal prefix, or every row).

    Returns:
        ``run(k, v)`` when k and v are finite (or not well-formed: the op's own checks then answer);
        otherwise ``run`` on k, v with the non-finite positions zeroed, and NaN in the rows ``reach``
        says see one of them (and in the state of each ``(b, h)`` that absorbed one).
    """
    if not _is_qkv(q, k, v):
        return run(k, v)
    bad = nonfinite_positions(k, v)  # (B, H_kv, M)
    if bad is None:
        return run(k, v)
    result = run(k.masked_fill(bad[..., None], 0), v.masked_fill(bad[..., None], 0))
    bad_heads = repeat(bad, "b hkv m -> b (hkv g) m", g=q.shape[1] // k.shape[1])  # (B, H, M)
    reach = standard_reach(causal, q.shape[2]) if reach is None else reach
    return _poison(result, reach(bad_heads), bad_heads.any(dim=-1))


def nonfinite_guarded(op: Callable[..., R]) -> Callable[..., R]:
    """Decorate an op ``op(q, k, v, *, causal=..., ...)`` whose visibility is the causal prefix (``causal``
    true) or every key: :func:`guard_nonfinite` with :func:`standard_reach` around every call."""
    default_causal = inspect.signature(op).parameters["causal"].default

    @functools.wraps(op)
    def guarded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> R:
        causal = options.get("causal", default_causal)
        return guard_nonfinite(lambda k, v: op(q, k, v, **options), q, k, v, causal=causal is True)

    return guarded


def guard_nonfinite_sequence(run: Callable[[torch.Tensor], R], x: torch.Tensor, *, causal: bool) -> R:
    """A layer's forward ``run(x)`` on ``x [B, N, dim]``: a non-finite token reaches only the rows that see it.

    Causal layers: rows at or after the first non-finite token of their sequence; bidirectional layers:
    every row of that sequence. Other rows are exactly the layer's output on ``x`` with the non-finite
    tokens zeroed. Extra outputs (auxiliary losses, states) of a poisoned sequence are NaN too.
    """
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 3 and x.numel() > 0
            and x.device.type != "meta"):
        return run(x)
    bad = nonfinite_positions(x, position_dim=1)  # (B, N)
    if bad is None:
        return run(x)
    result = run(x.masked_fill(bad[..., None], 0))
    rows = (bad.to(torch.int32).cumsum(dim=-1) > 0) if causal else bad.any(dim=-1, keepdim=True).expand_as(bad)
    return _poison_layer(result, rows, bad.any(dim=-1))


def nonfinite_guarded_forward(forward: Callable[..., R]) -> Callable[..., R]:
    """Decorate a layer's ``forward(self, x [B, N, dim], ...)``: :func:`guard_nonfinite_sequence` with the
    layer's ``self.causal``, so a non-finite token of ``x`` reaches only the rows that see it."""

    @functools.wraps(forward)
    def guarded(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> R:
        return guard_nonfinite_sequence(lambda x: forward(self, x, *args, **kwargs), x,
                                        causal=getattr(self, "causal", False) is True)

    return guarded


def _poison_layer(result: Any, rows: torch.Tensor, absorbed: torch.Tensor) -> Any:
    if isinstance(result, tuple):
        return tuple(_poison_layer(r, rows, absorbed) for r in result)
    if not (isinstance(result, torch.Tensor) and result.is_floating_point()):
        return result
    if result.ndim >= 2 and tuple(result.shape[:2]) == tuple(rows.shape):  # (B, N, ...) per token
        return result.masked_fill(rows.reshape(*rows.shape, *([1] * (result.ndim - 2))), float("nan"))
    if result.ndim >= 1 and result.shape[0] == rows.shape[0]:  # (B, ...) per sequence
        return result.masked_fill(absorbed.reshape(-1, *([1] * (result.ndim - 1))), float("nan"))
    return result + float("nan")  # a batch-wide quantity (an auxiliary loss) saw the non-finite tokens
