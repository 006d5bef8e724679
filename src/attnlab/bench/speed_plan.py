"""Planning a speed sweep: which series to time, and which cells to skip before running them.

A *series* is one (mechanism, impl, path, causal) timed at every length of the sweep. Before a cell
runs, its peak memory and time per call are predicted (from the series' earlier points, else from the
mechanism's complexity, else from two short probes) and a cell predicted over a limit is skipped
with the estimate that decided it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import attnlab
from attnlab.bench.cells import build_cell
from attnlab.bench.externals import ExternalBaseline
from attnlab.bench.memory import cpu_peak_memory_subprocess, cuda_peak_memory
from attnlab.bench.scaling import estimate_cell, predict_next
from attnlab.bench.speed_config import BASELINE, DTYPES, SpeedConfig
from attnlab.registry import Mechanism

__all__ = ["Series", "Estimate", "select_mechanisms", "plan_series", "memory_limit_bytes", "estimate_costs",
           "skip_reason", "is_baseline", "probe_estimate"]

# (name, impl, path, causal, record): record is None for an external baseline
PlannedSeries = tuple[str, str, str, bool, Mechanism | None]


@dataclass
class Series:
    """Measured points of one (mechanism, impl, path, mode) series, for the skip predictions."""

    lengths: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    memory_lengths: list[int] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)

    def add(self, N: int, row: Mapping[str, Any]) -> None:
        """Record a measured cell (its time, and its peak memory when there is one)."""
        self.lengths.append(N)
        self.times.append(row["time_ms"])
        if row.get("peak_bytes"):
            self.memory_lengths.append(N)
            self.memory.append(row["peak_bytes"])


@dataclass(frozen=True)
class Estimate:
    """A cell's predicted peak memory (bytes, and how it was obtained) and time per call (ms, or None)."""

    memory_bytes: float
    basis: str
    time_ms: float | None


def memory_limit_bytes(config: SpeedConfig) -> int:
    """``config.memory_limit_gb``, else 90% of the free GPU memory, else 60% of the available RAM."""
    if config.memory_limit_gb is not None:
        return int(config.memory_limit_gb * 2**30)
    if config.device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.9)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.6)
    except OSError:
        pass
    return 8 * 2**30


def select_mechanisms(mechanisms: Sequence[str] | str | None) -> list[Mechanism]:
    """The records named in ``mechanisms`` (a comma list or a sequence); ``None`` means all registered."""
    if mechanisms is None:
        return [m for m in attnlab.mechanisms()]
    names = [n.strip() for n in mechanisms.split(",")] if isinstance(mechanisms, str) else list(mechanisms)
    return [attnlab.get(n) for n in names if n]


def plan_series(records: Sequence[Mechanism], config: SpeedConfig, externals: Sequence[ExternalBaseline],
                say: Callable[[str], None]) -> list[PlannedSeries]:
    """(name, impl, path, causal, record) per series; layer-only records run through their layer, and
    then softmax runs as a layer too (``attnlab.nn.Attention``), the baseline of the layers."""
    plan: list[PlannedSeries] = []
    for record in records:
        causal = config.causal if (record.supports_causal and record.supports_bidirectional) else record.supports_causal
        if record.op is None:
            if record.role != "mixer" or record.layer is None:
                say(f"skipping {record.name!r}: a layer with role {record.role!r} (no op; only mixers are timed "
                    f"as layers x [B, N, dim] -> [B, N, dim])")
                continue
            plan.append((record.name, "layer", "layer", causal, record))
            continue
        impls: list[str] = []
        # e.g. no Triton kernel on a CPU run; an unresolved preset (device None) runs where resolving puts it
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        runnable = record.impls_on(torch.device(device).type)
        for impl in config.impls:
            if impl == "all":
                impls += ["auto", *runnable]
            elif impl == "auto" or impl == "reference" or impl in runnable:
                impls.append(impl)
        for impl in dict.fromkeys(impls):
            plan.append((record.name, impl, "op", causal, record))
    if any(path == "layer" for _, _, path, _, _ in plan):
        # the layers' own baseline: softmax (SDPA) inside attnlab.nn.Attention's projections, in the same run
        plan.append(("softmax", "layer", "layer", config.causal, attnlab.get("softmax")))
    for ext in externals:
        plan.append((ext.name, "external", "external", True if ext.causal_only else config.causal, None))
    return plan


def estimate_costs(spec: Mapping[str, Any], series: Series, config: SpeedConfig, exponent: float,
                   externals: Sequence[ExternalBaseline], limit: int) -> Estimate:
    """Predict the cell's peak memory and time per call.

    Memory: extrapolated from the series' measured points; with none, the analytic worst case of
    :func:`attnlab.bench.scaling.estimate_cell`, replaced by two short probes when that worst case is
    over ``limit`` and memory can be measured reliably (CUDA, or a subprocess per cell). Time:
    extrapolated from the series, or ``None`` before its first point.
    """
    N = spec["N"]
    memory = predict_next(series.memory_lengths, series.memory, N, default_exponent=exponent) if series.memory \
        else None
    basis = f"extrapolated from N={series.memory_lengths[-1]}" if series.memory else "analytic"
    if memory is None:
        dtype_bytes = torch.finfo(DTYPES[config.dtype]).bits // 8
        memory = estimate_cell(batch=spec["batch"], heads=config.heads, length=N, dim=config.dim,
                               dtype_bytes=dtype_bytes, mode=spec["mode"], exponent=exponent)
        if memory > limit and (config.device.startswith("cuda") or config.memory == "subprocess"):
            # the formula is a worst case: measure a short probe (where memory is measured reliably)
            memory, basis = probe_estimate(spec, exponent, externals, fallback=(memory, basis))
    return Estimate(memory, basis, predict_next(series.lengths, series.times, N, default_exponent=exponent))


def skip_reason(estimate: Estimate, *, limit: int, config: SpeedConfig, is_baseline: bool) -> str | None:
    """Why the cell is skipped (its estimate over a limit), or ``None`` to run it.

    The baseline of the ratios (softmax, impl "auto") is never skipped for time.
    """
    if estimate.memory_bytes > limit:
        return (f"estimated peak {estimate.memory_bytes / 2**30:.2f} GiB ({estimate.basis}) > limit "
                f"{limit / 2**30:.2f} GiB")
    if estimate.time_ms is not None and estimate.time_ms > config.max_cell_seconds * 1e3 and not is_baseline:
        return f"estimated {estimate.time_ms / 1e3:.1f} s per call > limit {config.max_cell_seconds:g} s"
    return None


def is_baseline(name: str, impl: str, path: str = "op") -> bool:
    """Whether (name, impl, path) is the baseline every ratio is taken against (softmax, impl "auto")."""
    return name == BASELINE and impl == "auto" and path == "op"


def probe_estimate(spec: Mapping[str, Any], exponent: float, externals: Sequence[ExternalBaseline], *,
                   fallback: tuple[float, str]) -> tuple[float, str]:
    """Peak memory of the cell from two short probes, ``a + b N^exponent`` fitted through both.

    Two lengths separate the fixed cost of a call (libraries, first-call buffers) from the part that
    grows with N. Measured with the CUDA allocator or in a fresh subprocess (in-process CPU figures
    are too noisy to decide a skip)."""
    n1 = max(16, min(spec["N"] // 16, 256))
    n2 = 2 * n1
    peaks = []
    try:
        for n in (n1, n2):
            probe = {**spec, "N": n}
            if spec["device"].startswith("cuda"):
                peaks.append(cuda_peak_memory(lambda p=probe: build_cell(p, externals=externals), spec["device"]))
            else:
                peaks.append(cpu_peak_memory_subprocess(probe))
    except Exception:  # a probe fails: keep the formula
        return fallback
    slope = (peaks[1] - peaks[0]) / (n2**exponent - n1**exponent)
    if slope <= 0:
        return fallback
    estimate = peaks[0] + slope * (spec["N"] ** exponent - n1**exponent)
    basis = (f"probes at N={n1}, {n2} measured {peaks[0] / 2**20:.1f}, {peaks[1] / 2**20:.1f} MiB, "
             f"fitted as a + b N^{exponent:g}")
    return estimate, basis
