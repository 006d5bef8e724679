"""The speed and memory benchmark: every registered mechanism x sequence length x mode, against SDPA.

``run_speed_benchmark(preset="cpu", out_dir="runs/speed")`` times each (mechanism, impl, N, mode)
cell (``mode`` "fwd" or "fwdbwd"), measures its peak memory, times softmax attention (SDPA) on the
same inputs in the same run and stores both absolute figures and ratios to it, one JSON line per
cell in ``out_dir/speed.jsonl`` (an interrupted run resumes where it stopped). Cells predicted not to
fit in memory (or to take too long) are skipped with the estimate that predicted it.

This module runs the sweep; the parts it drives live beside it: the configuration and presets
(:mod:`~attnlab.bench.speed_config`), timing (:mod:`~attnlab.bench.timing`), memory measurement
(:mod:`~attnlab.bench.memory`), the cells and their options (:mod:`~attnlab.bench.cells`,
:mod:`~attnlab.bench.speed_options`), external baselines (:mod:`~attnlab.bench.externals`), the plan
and skip rules (:mod:`~attnlab.bench.speed_plan`, :mod:`~attnlab.bench.scaling`) and the tables and
plots (:mod:`~attnlab.bench.speed_report`).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.bench.cells import build_cell, cell_spec
from attnlab.bench.externals import ExternalBaseline, available_externals
from attnlab.bench.memory import cpu_peak_memory_inline, cpu_peak_memory_subprocess, cuda_peak_memory
from attnlab.bench.results import append_result, exclusive_writer, load_results, result_key, versions
from attnlab.bench.scaling import complexity_exponent, scaling_exponents
from attnlab.bench.speed_config import BASELINE, DTYPES, KEY_FIELDS, RESULTS_FILE, SpeedConfig, resolve_config
from attnlab.bench.speed_options import bench_options, describe_options
from attnlab.bench.speed_plan import (
    Series,
    estimate_costs,
    is_baseline,
    memory_limit_bytes,
    plan_series,
    select_mechanisms,
    skip_reason,
)
from attnlab.bench.speed_report import (
    LENGTH_CAP_REASON,
    TIME_BUDGET_REASON,
    crossover_lines,
    memory_ratio,
    memory_text,
    write_speed_report,
)
from attnlab.bench.timing import time_callable
from attnlab.registry import Mechanism

__all__ = ["run_speed_benchmark"]


def run_speed_benchmark(*, preset: str | SpeedConfig = "cpu", out_dir: str | os.PathLike[str],
                        mechanisms: Sequence[str] | str | None = None, resume: bool = True,
                        say: Callable[[str], None] | None = None, write_report: bool = True,
                        **overrides: Any) -> list[dict[str, Any]]:
    """Run the sweep of ``preset`` (overridden by ``overrides``, fields of :class:`SpeedConfig`).

    ``mechanisms`` ``None``: the preset's list (``SpeedConfig.mechanisms``), else every registered one.
    Every (mechanism, impl, N, mode) cell appends one row to ``out_dir/speed.jsonl``; softmax
    attention (SDPA, impl "auto") is timed for every (N, mode, causal) in the same run and each row
    carries ``time_ratio`` and ``memory_ratio`` to it. With ``resume`` (default) cells already in the
    file are not run again. The folder is held with :func:`attnlab.bench.results.exclusive_writer`
    while the sweep runs (a second writer is refused). Returns the rows of this sweep (loaded or new),
    and writes ``speed.md`` / ``speed.html`` (table and log-log plots) unless ``write_report=False``.
    """
    config = resolve_config(preset, overrides)
    say = say or print
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        # one writer per folder: a second sweep into the same --out would time the same cells twice
        with exclusive_writer(out_dir):
            return _run(config, preset, out_dir, mechanisms, resume, say, write_report)
    finally:
        torch.set_num_threads(threads)


class _Sweep:
    """The state of one sweep: the results file, rows already in it, the series measured so far."""

    def __init__(self, config: SpeedConfig, preset: str | SpeedConfig, path: Path, resume: bool,
                 externals: Sequence[ExternalBaseline]) -> None:
        self.config, self.path, self.externals = config, path, externals
        self.preset = preset if isinstance(preset, str) else "custom"
        self.existing = ({result_key(r, KEY_FIELDS): r for r in load_results(path) if r.get("kind") == "speed"}
                         if resume else {})
        self.limit = memory_limit_bytes(config)
        self.stamp = {**versions(), "device_name": _device_name(config.device)}
        self.series: dict[tuple[str, str, str, str], Series] = {}
        self.started = time.perf_counter()

    def cell(self, name: str, impl: str, path_kind: str, causal: bool, record: Mechanism | None, N: int,
             mode: str) -> dict[str, Any]:
        """The row of one cell: read back from the file when already done, else estimated, then
        skipped or measured, and appended to the file."""
        config = self.config
        spec = cell_spec(mechanism=name, impl=impl, path=path_kind, N=N, mode=mode, causal=causal,
                         batch=config.batch_for(N), heads=config.heads, dim=config.dim, dtype=config.dtype,
                         device=config.device, seed=config.seed)
        row = {"kind": "speed", **spec, "family": record.family if record else "external",
               "complexity": record.complexity if record else "", "preset": self.preset}
        key = result_key(row, KEY_FIELDS)
        series = self.series.setdefault((name, impl, path_kind, mode), Series())
        done = self.existing.get(key)
        if done is not None and str(done.get("reason", "")).startswith(TIME_BUDGET_REASON):
            done = None  # left out for want of time last run: a rerun tries it again
        if done is not None and done.get("status") == "ok":
            series.add(N, done)
            return done
        # a cell skipped by an earlier run is decided again under this run's limits (a larger
        # --max-cell-seconds or --memory-limit-gb runs it); skipped again for the same reason, it is not
        # written twice
        earlier_skip = done if done is not None and done.get("status") == "skipped" else None
        if record is not None and path_kind == "op":
            ctx = {"batch": spec["batch"], "heads": config.heads, "N": N, "dim": config.dim,
                   "device": torch.device(config.device), "dtype": DTYPES[config.dtype]}
            try:
                row["options"] = describe_options(bench_options(record, ctx))
            except Exception as error:  # an option builder that does not fit: recorded as the cell's error
                row["options"] = {"error": str(error)}
        spent = time.perf_counter() - self.started
        if _past_cap(config, name, impl, N):
            row.update(status="skipped", reason=f"{LENGTH_CAP_REASON} N <= {config.length_cap} for this mechanism "
                                                f"(the preset runs only {', '.join(config.length_cap_exempt)} and "
                                                "softmax longer)")
        elif spent > config.max_total_seconds:
            row.update(status="skipped", reason=f"{TIME_BUDGET_REASON} the sweep's {config.max_total_seconds:g} s "
                                                f"were spent ({spent:.0f} s); rerun the same command to add it")
        if row.get("status") == "skipped":
            return self._skipped(row, earlier_skip)
        exponent = complexity_exponent(record, impl) if record else 1.0
        estimate = estimate_costs(spec, series, config, exponent, self.externals, self.limit)
        row["estimate_bytes"] = int(estimate.memory_bytes)
        row["estimate_basis"] = estimate.basis
        row["estimate_ms"] = estimate.time_ms
        reason = skip_reason(estimate, limit=self.limit, config=config,
                             is_baseline=name == BASELINE and impl == "auto")
        if reason is not None:
            row.update(status="skipped", reason=reason)
            return self._skipped(row, earlier_skip)
        try:
            row.update(_measure(spec, config, self.externals))
            row["status"] = "ok"
            series.add(N, row)
        except Exception as error:  # a cell that fails is recorded, not fatal
            row.update(status="error", reason=f"{type(error).__name__}: {str(error).strip()[:300]}")
            if isinstance(error, torch.OutOfMemoryError) and config.device.startswith("cuda"):
                torch.cuda.empty_cache()
        row.update(self.stamp, timestamp=datetime.now(UTC).isoformat(timespec="seconds"))
        append_result(self.path, row)
        return row

    def _skipped(self, row: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
        """Record a skipped cell, unless an earlier run already recorded it with the same reason."""
        if earlier is not None and earlier.get("reason") == row.get("reason"):
            return earlier
        row.update(self.stamp, timestamp=datetime.now(UTC).isoformat(timespec="seconds"))
        append_result(self.path, row)
        return row


def _run(config: SpeedConfig, preset: str | SpeedConfig, out_dir: str | os.PathLike[str],
         mechanisms: Sequence[str] | str | None, resume: bool, say: Callable[[str], None],
         write_report: bool) -> list[dict[str, Any]]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    records = select_mechanisms(mechanisms if mechanisms is not None else config.mechanisms)
    externals = available_externals(config.externals, torch.device(config.device).type, report=say)
    plan = plan_series(records, config, externals, say)
    sweep = _Sweep(config, preset, path, resume, externals)
    baseline = attnlab.get(BASELINE)
    rows: list[dict[str, Any]] = []
    baselines: dict[tuple[int, str, bool], dict[str, Any]] = {}
    start = time.perf_counter()
    # Softmax first at every (N, mode, causal) that the plan needs: the baseline of the ratios.
    # Shortest lengths first, so that an interrupted run has every mechanism at the short lengths.
    causal_kinds = sorted({causal for (_, _, _, causal, _) in plan}, reverse=True)
    for N in config.lengths:
        for mode in config.modes:
            for causal in causal_kinds:
                # a baseline nobody is compared with at this N (every series of its kind past the length cap,
                # e.g. bidirectional softmax for agent alone) is not timed: {} stands for it
                needed = any(c == causal and (is_baseline(name, impl, kind) or not _past_cap(config, name, impl, N))
                             for name, impl, kind, c, _ in plan)
                baselines[(N, mode, causal)] = (sweep.cell(BASELINE, "auto", "op", causal, baseline, N, mode)
                                                if needed else {})
            for name, impl, path_kind, causal, record in plan:
                if is_baseline(name, impl, path_kind):
                    row = baselines[(N, mode, causal)]
                else:
                    row = sweep.cell(name, impl, path_kind, causal, record, N, mode)
                row = dict(row)
                _attach_ratios(row, baselines[(N, mode, causal)])
                rows.append(row)
                say(_line(row))
    if not any(is_baseline(name, impl, kind) for name, impl, kind, _, _ in plan):
        for base in (b for b in baselines.values() if b):  # the baseline is in the table even when not asked for
            row = dict(base)
            _attach_ratios(row, base)
            rows.insert(0, row)
            say(_line(row))
    say(f"speed benchmark: {len(rows)} cells in {time.perf_counter() - start:.1f} s -> {path}")
    for (name, impl, mode, causal), fit in scaling_exponents(rows).items():
        t = "-" if fit["time"] is None else f"{fit['time']:.2f}"
        m = "-" if fit["memory"] is None else f"{fit['memory']:.2f}"
        kind = "causal" if causal else "bidir."
        say(f"  exponent in N  {name:>24s} {impl:>9s} {mode:>6s} {kind}: time {t}, memory {m}  "
            f"(N = {fit['lengths']})")
    for line in crossover_lines(rows):
        say(f"  crossover {line}")
    if write_report:
        for written in write_speed_report(out):
            say(f"wrote {written}")
    return rows


def _past_cap(config: SpeedConfig, name: str, impl: str, N: int) -> bool:
    """Whether the preset's length cap leaves this (mechanism, impl) out at length ``N``."""
    return (config.length_cap is not None and N > config.length_cap and name not in config.length_cap_exempt
            and not (name == BASELINE and impl == "auto"))


def _attach_ratios(row: dict[str, Any], base: Mapping[str, Any]) -> None:
    ok = row.get("status") == "ok" and base.get("status") == "ok"
    row["baseline_time_ms"] = base.get("time_ms")
    row["baseline_peak_bytes"] = base.get("peak_bytes")
    row["time_ratio"] = row["time_ms"] / base["time_ms"] if ok and base.get("time_ms") else None
    row["memory_ratio"] = memory_ratio(row, base) if ok else None


def _line(row: Mapping[str, Any]) -> str:
    head = f"{row['mechanism']:>24s} {row['impl']:>9s} {row['mode']:>6s} N={row['N']:<6d}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}: {row.get('reason')}"
    mem = f"{memory_text(row):>16s}"
    ratio = f"x{row['time_ratio']:.2f} softmax" if row.get("time_ratio") else ""
    return f"{head} {row['time_ms']:10.3f} ms (+-{row['spread'] * 100:.0f}%) {mem}  {ratio}"


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _measure(spec: Mapping[str, Any], config: SpeedConfig, externals: Sequence[ExternalBaseline]) -> dict[str, Any]:
    """Time one cell (and measure its memory as ``config.memory`` says)."""
    device = torch.device(spec["device"])
    fn = build_cell(spec, externals=externals)
    timing = time_callable(fn, device=device, warmup=config.warmup, repeats=config.repeats,
                           max_repeats=config.max_repeats, min_seconds=config.min_seconds,
                           max_seconds=config.max_seconds, gpu_warmup_ms=config.gpu_warmup_ms,
                           gpu_rep_ms=config.gpu_rep_ms)
    result: dict[str, Any] = {"time_ms": timing.median_ms, "time_q25_ms": timing.q25_ms,
                              "time_q75_ms": timing.q75_ms, "spread": timing.spread, "repeats": timing.repeats}
    del fn
    result["peak_bytes"] = None
    try:
        if device.type == "cuda":
            result["memory_method"] = "torch.cuda.max_memory_allocated"
            result["peak_bytes"] = cuda_peak_memory(lambda: build_cell(spec, externals=externals), device)
        elif config.memory == "subprocess":
            result["memory_method"] = "peak RSS above a fresh subprocess's own (after a warm-up at a short N)"
            # the child imports torch and attnlab first: slow on a loaded machine
            timeout = max(600.0, 20 * timing.median_ms / 1e3)
            result["peak_bytes"] = cpu_peak_memory_subprocess(spec, timeout=timeout)
        elif config.memory == "inline":
            result["memory_method"] = "peak RSS above the process's before the inputs, same process (approximate)"
            # the timed calls just ran this cell here: they were the warm-up
            result["peak_bytes"] = cpu_peak_memory_inline(lambda: build_cell(spec, externals=externals),
                                                          warmup=False)
        else:
            result["memory_method"] = "none (not measured)"
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:  # the timing stands without it
        result["memory_error"] = f"{type(error).__name__}: {str(error).strip()[:200]}"
    return result
