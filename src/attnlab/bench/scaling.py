"""Power laws in the sequence length N: fitted exponents, extrapolations and first estimates.

The runner uses them to skip a cell predicted not to fit (in memory or in time) before running it;
the report prints the fitted exponent of every series.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attnlab.bench.memory import MEMORY_RESOLUTION_BYTES
from attnlab.registry import Mechanism

__all__ = ["fit_exponent", "predict_next", "complexity_exponent", "estimate_cell", "scaling_exponents"]


def fit_exponent(lengths: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of ``log(value)`` against ``log(N)`` (``value ~ c N^slope``).

    ``None`` when fewer than two distinct positive points remain.
    """
    points = [(math.log(n), math.log(v)) for n, v in zip(lengths, values, strict=True)
              if n and v and n > 0 and v > 0 and math.isfinite(v)]
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx


def predict_next(lengths: Sequence[int], values: Sequence[float], length: int, *,
                 default_exponent: float) -> float | None:
    """Extrapolate ``value(length)`` from measured points (power law through the last point).

    The exponent is fitted on the last two points, or ``default_exponent`` with one point; it is never
    taken below ``default_exponent / 2`` so a noisy flat start cannot hide a quadratic cost.
    """
    pairs = sorted((n, v) for n, v in zip(lengths, values, strict=True) if v and v > 0)
    if not pairs:
        return None
    exponent = default_exponent
    if len(pairs) >= 2:
        fitted = fit_exponent([n for n, _ in pairs[-2:]], [v for _, v in pairs[-2:]])
        if fitted is not None:
            exponent = max(fitted, default_exponent / 2)
    n_last, v_last = pairs[-1]
    return v_last * (length / n_last) ** exponent


def complexity_exponent(record: Mechanism | None, impl: str) -> float:
    """The power of N in a mechanism's cost, read off its ``complexity`` ("O(N^2 d)" -> 2, "O(N d)" -> 1)."""
    if impl == "reference":
        return 2.0
    text = (record.complexity if record is not None else "O(N^2)").replace(" ", "")
    for power in ("N^3", "N³"):
        if power in text:
            return 3.0
    for power in ("N^2", "N²", "NM", "N*M", "N·M"):
        if power in text:
            return 2.0
    return 1.0


def estimate_cell(*, batch: int, heads: int, length: int, dim: int, dtype_bytes: int, mode: str,
                  exponent: float) -> int:
    """A first memory estimate in bytes before anything was measured for this mechanism.

    Inputs and output (with gradients for "fwdbwd") plus, for a quadratic cost, the float32 score
    and probability matrices ``[B, H, N, N]`` a dense implementation holds (cubic: one more N).
    """
    io = 4 * batch * heads * length * dim * dtype_bytes * (2 if mode == "fwdbwd" else 1)
    if exponent < 1.5:
        return io
    scores = batch * heads * length * length * 4 * (3 if mode == "fwdbwd" else 2)
    if exponent >= 2.5:
        scores *= length
    return io + scores


def _resolved(row: Mapping[str, Any]) -> bool:
    peak = row.get("peak_bytes")
    return isinstance(peak, int | float) and peak >= MEMORY_RESOLUTION_BYTES


def scaling_exponents(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, bool], dict[str, Any]]:
    """Fitted exponents of time and peak memory in N per (mechanism, impl, mode, causal), from result rows."""
    groups: dict[tuple[str, str, str, bool], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("kind") == "speed" and row.get("status") == "ok":
            groups.setdefault((row["mechanism"], row["impl"], row["mode"], bool(row["causal"])), []).append(row)
    out = {}
    for key, items in sorted(groups.items()):
        items = sorted(items, key=lambda r: r["N"])
        ns = [r["N"] for r in items]
        out[key] = {
            "lengths": ns,
            "time": fit_exponent(ns, [r["time_ms"] for r in items]),
            # figures under the measurement's resolution say little about growth: left out of the fit
            "memory": fit_exponent([r["N"] for r in items if _resolved(r)],
                                   [r["peak_bytes"] for r in items if _resolved(r)]),
        }
    return out
