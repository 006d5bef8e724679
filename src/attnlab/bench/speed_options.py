"""The options a speed-benchmark cell passes to each mechanism at a shape (B, H, N, D).

:func:`bench_options` is the one entry point; the runner, the cell builder and the external
baselines (which reuse lightning's decay rates) call it or the builders here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from attnlab.ops import alibi_bias_factors, lightning_decay_slopes
from attnlab.registry import Mechanism

__all__ = ["BENCH_OPTIONS", "bench_options", "describe_options", "odd_at_most", "lightning_options"]


def lightning_options(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """Lightning's per-head decay rates (the ALiBi-style slopes of TransNormerLLM), shape (H,)."""
    return {"decay": lightning_decay_slopes(ctx["heads"]).to(ctx["device"])}


def _flashbias_options(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """Causal ALiBi as rank-2 factors ``q_bias, k_bias`` of shape (1, H, N, 2)."""
    # built in the benchmark dtype: the builder keeps the factors exact in bf16
    q_bias, k_bias = alibi_bias_factors(ctx["heads"], ctx["N"], dtype=ctx["dtype"], device=ctx["device"])
    return {"q_bias": q_bias, "k_bias": k_bias}


def _dynamic_mask_options(ctx: Mapping[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(ctx["batch"], ctx["heads"], ctx["N"], generator=g)
    return {"key_bias": bias.to(ctx["device"], ctx["dtype"]), "k_budget": min(128, ctx["N"])}


def odd_at_most(n: int, cap: int) -> int:
    """The largest odd number <= min(n, cap): a centred kernel needs an odd size."""
    k = min(cap, n)
    return k if k % 2 else k - 1


# Benchmark options per registered name: a dict, or a function of the cell context (B, H, N, D,
# device, dtype) for options that are tensors or depend on N. Names not listed use the record's
# bf16 check options (realistic sizes), else its check options.
BENCH_OPTIONS: dict[str, Mapping[str, Any] | Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "softmax": {},
    "lightning": lightning_options,
    "linear": {},
    "sliding_window": lambda ctx: {"window": min(128, ctx["N"])},
    "neighborhood": lambda ctx: {"kernel_size": odd_at_most(ctx["N"] // 2, 127)},
    "flashbias": _flashbias_options,
    "dynamic_mask": _dynamic_mask_options,
    "agent": lambda ctx: {"num_agents": min(49, ctx["N"])},
}


def bench_options(record: Mechanism, ctx: Mapping[str, Any]) -> dict[str, Any]:
    """The options a benchmark cell passes to ``record`` (see :data:`BENCH_OPTIONS`)."""
    entry = BENCH_OPTIONS.get(record.name)
    if entry is None:
        c = record.check
        return dict(c.bf16_options if c.bf16_options is not None else c.options)
    return dict(entry(ctx) if callable(entry) else entry)


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
