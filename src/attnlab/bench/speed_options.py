"""The options a speed-benchmark cell passes to each mechanism at a shape (B, H, N, D).

Each record says what its op needs at a shape (``Mechanism.bench_options``, e.g. lightning's decay
slopes, flashbias's ALiBi factors); :func:`bench_options` is the one entry point the runner, the cell
builder and the external baselines (which reuse lightning's decay rates) call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import attnlab
from attnlab.registry import BenchShape, Mechanism

__all__ = ["bench_shape", "bench_options", "describe_options", "odd_at_most", "lightning_options"]


def bench_shape(ctx: Mapping[str, Any]) -> BenchShape:
    """The :class:`~attnlab.registry.BenchShape` of a cell context (batch, heads, N, dim, device, dtype);
    k and v have ``kv_heads`` heads when the context says so, else ``heads``."""
    return BenchShape(batch=ctx["batch"], heads=ctx["heads"], kv_heads=ctx.get("kv_heads", ctx["heads"]),
                      length=ctx["N"], head_dim=ctx["dim"], device=ctx["device"], dtype=ctx["dtype"])


def bench_options(record: Mechanism, ctx: Mapping[str, Any]) -> dict[str, Any]:
    """The options a benchmark cell passes to ``record``'s op: the record's ``bench_options`` at the cell's shape."""
    return record.options_for_bench(bench_shape(ctx))


def lightning_options(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """Lightning's benchmark options (the per-head decay rates of TransNormerLLM, shape (H,)), for the
    external baselines that must run the same decay."""
    return bench_options(attnlab.get("lightning"), ctx)


def odd_at_most(n: int, cap: int) -> int:
    """The largest odd number <= min(n, cap): a centred kernel needs an odd size."""
    k = min(cap, n)
    return k if k % 2 else k - 1


def describe_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-friendly options: tensors become their shape."""
    out = {}
    for name, value in options.items():
        if isinstance(value, torch.Tensor):
            out[name] = f"tensor{list(value.shape)}" if value.numel() > 8 else [round(float(x), 6) for x in value]
        elif isinstance(value, int | float | str | bool) or value is None:
            out[name] = value
        else:
            out[name] = repr(value)
    return out
