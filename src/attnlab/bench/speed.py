"""The speed and memory benchmark: every registered mechanism x sequence length x mode, against SDPA.

``run_speed_benchmark(preset="cpu", out_dir="runs/speed")`` times each (mechanism, impl, N, mode)
cell (``mode`` "fwd" or "fwdbwd"), measures its peak memory, times softmax attention (SDPA) on the
same inputs in the same run and stores both absolute figures and ratios to it, one JSON line per
cell in ``out_dir/speed.jsonl`` (an interrupted run resumes where it stopped). Cells predicted not to
fit in memory (or to take too long) are skipped with the estimate that predicted it.

Timing: median and quartiles of repeated calls after a warm-up; on a GPU ``triton.testing.do_bench``
(CUDA events) when available. Peak memory: on a GPU ``torch.cuda.max_memory_allocated``; on the CPU
the peak resident set of a fresh subprocess per cell (Linux ``VmHWM``, reset just before the call),
so that cells cannot contaminate each other. Both count the inputs (and their gradients) as well as
what the call allocates on top.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.bench.results import append_result, load_results, result_key, versions
from attnlab.registry import Mechanism

__all__ = [
    "PRESETS",
    "SpeedConfig",
    "Timing",
    "time_callable",
    "cuda_peak_memory",
    "cpu_peak_memory_inline",
    "cpu_peak_memory_subprocess",
    "fit_exponent",
    "predict_next",
    "estimate_cell",
    "scaling_exponents",
    "run_speed_benchmark",
    "RESULTS_FILE",
]

RESULTS_FILE = "speed.jsonl"
BASELINE = "softmax"
MODES = ("fwd", "fwdbwd")
KEY_FIELDS = ("kind", "mechanism", "impl", "path", "N", "mode", "causal", "batch", "heads", "dim", "dtype",
              "device")


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SpeedConfig:
    """One benchmark sweep.

    Attributes:
        lengths: sequence lengths N (keys = queries, self-attention).
        batch: B; ignored when ``tokens`` is set (then ``B = tokens // N``, a constant work per call).
        heads, dim: H and the head dim D of q, k, v.
        dtype: "float32", "bfloat16", "float16".
        modes: "fwd" and/or "fwdbwd" (forward plus backward of a random output gradient).
        causal: time the causal form where the mechanism defines one (else its bidirectional form).
        impls: the impls to time per op ("auto" by default; "all" = auto + every registered fast path).
        warmup, repeats: calls before timing and timed calls (CPU; on a GPU milliseconds of
            ``do_bench`` warm-up / repeat: ``gpu_warmup_ms``, ``gpu_rep_ms``).
        min_seconds: on the CPU, keep repeating (up to ``max_repeats``) until this much time was measured.
        max_seconds: on the CPU, stop repeating after this long per cell (at least one timed call).
        threads: torch CPU threads during the sweep (``None``: torch's default).
        memory: "subprocess" (CPU: fresh process per cell), "inline" (CPU: same process, peak RSS
            reset before the call; approximate), "none"; on a GPU always the CUDA allocator's peak.
        memory_limit_gb: cells whose estimate exceeds it are skipped (default: 60% of available memory).
        max_cell_seconds: cells whose predicted single-call time exceeds it are skipped.
        externals: optional external baselines tried when installed ("fla", "natten", "flex").
        device: "cpu" or "cuda" (default: cuda when available, else cpu).
    """

    lengths: tuple[int, ...] = (256, 1024, 4096)
    batch: int = 1
    heads: int = 4
    dim: int = 64
    dtype: str = "float32"
    modes: tuple[str, ...] = ("fwd", "fwdbwd")
    causal: bool = True
    impls: tuple[str, ...] = ("auto",)
    tokens: int | None = None
    warmup: int = 1
    repeats: int = 3
    max_repeats: int = 20
    min_seconds: float = 0.5
    max_seconds: float = math.inf
    threads: int | None = None
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    memory: str = "subprocess"
    memory_limit_gb: float | None = None
    max_cell_seconds: float = 20.0
    externals: tuple[str, ...] = ("fla", "natten", "flex")
    device: str | None = None
    seed: int = 0

    def batch_for(self, length: int) -> int:
        return max(1, self.tokens // length) if self.tokens else self.batch


PRESETS: dict[str, SpeedConfig] = {
    # seconds, for tests: tiny sizes, no memory subprocesses
    "smoke": SpeedConfig(lengths=(32, 64), heads=2, dim=16, modes=("fwd",), repeats=2, max_repeats=3,
                         min_seconds=0.0, max_seconds=0.5, memory="none", max_cell_seconds=0.5, externals=()),
    # what the demo runs (~60 s on a 2-core CPU): two lengths, forward only, in-process memory
    "demo": SpeedConfig(lengths=(128, 512), heads=4, dim=32, modes=("fwd",), repeats=2, max_repeats=5,
                        min_seconds=0.05, max_seconds=1.0, memory="inline", max_cell_seconds=1.0, externals=()),
    # the CPU table of docs/benchmarks.md: B=1, H=4, D=64, float32, causal, 1k-16k tokens
    "cpu": SpeedConfig(lengths=(1024, 4096, 16384), heads=4, dim=64, modes=("fwd", "fwdbwd"),
                       repeats=3, max_repeats=10, min_seconds=0.5, max_seconds=60.0, memory="subprocess",
                       max_cell_seconds=15.0,
                       externals=("natten",)),
    # the anchor shape of shared/anchors/gpu_h200.md: bf16, H=16, D=128, 65,536 tokens per call
    "gpu": SpeedConfig(lengths=(1024, 4096, 16384, 65536), tokens=65536, heads=16, dim=128, dtype="bfloat16",
                       modes=("fwd", "fwdbwd"), memory="cuda", max_cell_seconds=5.0, device="cuda"),
}


# --------------------------------------------------------------------------------------------------
# timing and memory helpers


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one call: median, quartiles, and how many calls were timed."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    repeats: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q75_ms - self.q25_ms) / self.median_ms if self.median_ms > 0 else 0.0


def _quartiles(times: Sequence[float]) -> Timing:
    ordered = sorted(times)
    if len(ordered) == 1:
        return Timing(ordered[0], ordered[0], ordered[0], 1)
    q = statistics.quantiles(ordered, n=4, method="inclusive")
    return Timing(statistics.median(ordered), q[0], q[2], len(ordered))


def time_callable(fn: Callable[[], Any], *, device: str | torch.device = "cpu", warmup: int = 1, repeats: int = 3,
                  max_repeats: int = 20, min_seconds: float = 0.0, max_seconds: float = math.inf,
                  gpu_warmup_ms: int = 25, gpu_rep_ms: int = 100,
                  clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time ``fn()`` (ms per call): ``warmup`` untimed calls, then at least ``repeats`` timed calls.

    CPU: a host clock around each call; calls continue until ``min_seconds`` of timed calls or
    ``max_repeats``, and stop after ``max_seconds`` (warm-up included) even below ``repeats`` (at
    least one timed call: a slow cell costs a few calls, not ``repeats`` of them).
    CUDA: ``triton.testing.do_bench`` (CUDA events, median and quartiles) when
    triton imports, else CUDA events around each of the calls.
    """
    device = torch.device(device)
    if warmup < 0 or repeats < 1 or max_repeats < repeats:
        raise ValueError(f"need warmup >= 0 and 1 <= repeats <= max_repeats, got {warmup}, {repeats}, {max_repeats}")
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            q25, median, q75 = do_bench(fn, warmup=gpu_warmup_ms, rep=gpu_rep_ms, quantiles=[0.25, 0.5, 0.75])
            return Timing(float(median), float(q25), float(q75), -1)
        for _ in range(max(warmup, 1)):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return _quartiles(times)
    budget_start = clock()
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while not times or (
            (len(times) < repeats or (spent < min_seconds and len(times) < max_repeats))
            and clock() - budget_start < max_seconds):
        t0 = clock()
        fn()
        elapsed = clock() - t0
        times.append(elapsed * 1e3)
        spent += elapsed
    return _quartiles(times)


def cuda_peak_memory(setup: Callable[[], Callable[[], Any]], device: str | torch.device = "cuda") -> int:
    """Peak bytes the CUDA allocator held while ``setup()`` built the inputs and the call ran, above
    what was allocated before ``setup``."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    fn = setup()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


_MMAP_THRESHOLD = 128 * 1024


def _fix_malloc_threshold() -> None:
    """Make glibc return every block >= 128 KiB to the system when freed (no dynamic threshold).

    Otherwise a freed large block raises glibc's mmap threshold and a later call reuses resident heap
    memory unseen by the peak-RSS mark. Ignored where glibc's ``mallopt`` is absent.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def cpu_peak_memory_inline(setup: Callable[[], Callable[[], Any]], *, warmup: bool = True) -> int:
    """Peak resident bytes above the resident set before ``setup()`` built the inputs, in this process.

    The kernel's peak mark is reset after the warm-up call so that only the measured call counts.
    Approximate: memory the allocator kept from earlier work can be reused unseen.
    """
    import gc

    _fix_malloc_threshold()
    gc.collect()
    before = _proc_status_kb("VmRSS")
    fn = setup()
    if warmup:
        fn()
        gc.collect()
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs): no CPU memory figure")
    at_reset = _proc_status_kb("VmRSS")
    fn()
    call = _proc_status_kb("VmHWM") - at_reset  # what the call itself added at its peak
    inputs = max(0, at_reset - before)  # what setup added (0 if unrelated memory was freed meanwhile)
    return max(0, call + inputs) * 1024


def cpu_peak_memory_subprocess(spec: Mapping[str, Any], *, timeout: float = 300.0) -> int:
    """Peak resident bytes of one benchmark cell, measured in a fresh Python process.

    ``spec`` is a cell description (see :func:`_cell_spec`); the child builds the same inputs and call,
    measures with :func:`cpu_peak_memory_inline` and prints the figure as JSON.
    """
    env = dict(os.environ)
    src = str(Path(attnlab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)  # fixed threshold from the start (see above)
    result = subprocess.run([sys.executable, "-m", "attnlab.bench.speed", "--memory-cell", json.dumps(dict(spec))],
                            capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory subprocess failed: {tail}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


# --------------------------------------------------------------------------------------------------
# scaling fits and estimates


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
            "memory": fit_exponent([r["N"] for r in items if r.get("peak_bytes")],
                                   [r["peak_bytes"] for r in items if r.get("peak_bytes")]),
        }
    return out


# --------------------------------------------------------------------------------------------------
# what to run: options per mechanism, cells, external baselines


def _lightning_options(ctx: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from attnlab.ops import lightning_decay_slopes
    except ImportError:
        return {"decay": 0.01}
    return {"decay": lightning_decay_slopes(ctx["heads"]).to(ctx["device"])}


def _flashbias_options(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """Causal ALiBi factors (rank 2) when the builder exists, else random rank-2 factors."""
    try:
        from attnlab.ops import alibi_bias_factors

        # built in the benchmark dtype: the builder keeps the factors exact in bf16
        q_bias, k_bias = alibi_bias_factors(ctx["heads"], ctx["N"], dtype=ctx["dtype"], device=ctx["device"])
        return {"q_bias": q_bias, "k_bias": k_bias}
    except ImportError:
        g = torch.Generator().manual_seed(1)
        shape = (1, ctx["heads"], ctx["N"], 2)
        return {"q_bias": torch.randn(*shape, generator=g).to(ctx["device"], ctx["dtype"]),
                "k_bias": torch.randn(*shape, generator=g).to(ctx["device"], ctx["dtype"])}


def _dynamic_mask_options(ctx: Mapping[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(ctx["batch"], ctx["heads"], ctx["N"], generator=g)
    return {"key_bias": bias.to(ctx["device"], ctx["dtype"]), "k_budget": min(128, ctx["N"])}


def _odd_at_most(n: int, cap: int) -> int:
    k = min(cap, n)
    return k if k % 2 else k - 1


# Benchmark options per registered name: a dict, or a function of the cell context (B, H, N, D,
# device, dtype) for options that are tensors or depend on N. Names not listed use the record's
# bf16 check options (realistic sizes), else its check options.
BENCH_OPTIONS: dict[str, Mapping[str, Any] | Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "softmax": {},
    "lightning": _lightning_options,
    "linear": {},
    "sliding_window": lambda ctx: {"window": min(128, ctx["N"])},
    "neighborhood": lambda ctx: {"kernel_size": _odd_at_most(ctx["N"] // 2, 127)},
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


def _describe(options: Mapping[str, Any]) -> dict[str, Any]:
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


@dataclass(frozen=True)
class ExternalBaseline:
    """An implementation outside attnlab, timed when its package imports."""

    name: str  # row name, e.g. "fla:chunk_simple_gla"
    package: str  # the group users enable ("fla", "natten", "flex")
    module: str  # what must import
    devices: tuple[str, ...]
    causal_only: bool
    build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, Mapping[str, Any]], Callable[[], Any]]
    note: str = ""


def _token_major(*xs: torch.Tensor) -> list[torch.Tensor]:
    """``[B, H, N, D]`` tensors as contiguous ``[B, N, H, D]`` leaves (fla's and NATTEN's layout), made
    outside the timed call; gradients land on these leaves (listed as ``run.leaves``)."""
    return [x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in xs]


def _fla_simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    ctx: Mapping[str, Any]) -> Callable[[], Any]:
    """fla's ``chunk_simple_gla`` with attnlab's lightning decay: ``g_gamma = -s_h`` (log of lambda_h)."""
    from fla.ops.simple_gla import chunk_simple_gla

    qt, kt, vt = _token_major(q, k, v)  # (B, N, H, D)
    decay = _lightning_options({**ctx, "device": q.device})["decay"]  # the lightning cell's per-head rates
    rates = decay if isinstance(decay, torch.Tensor) else torch.full((ctx["heads"],), float(decay))
    g_gamma = -rates.float().to(q.device)  # (H,)
    if "g_gamma" in inspect.signature(chunk_simple_gla).parameters:
        kwargs: dict[str, Any] = {"g_gamma": g_gamma}
    else:  # older fla: a per-token log decay [B, N, H]
        kwargs = {"g": g_gamma.expand(qt.shape[0], qt.shape[1], -1).contiguous()}

    def run() -> torch.Tensor:
        return chunk_simple_gla(qt, kt, vt, scale=1.0, **kwargs)[0].transpose(1, 2)  # (B, H, N, D)

    run.leaves = [qt, kt, vt]
    return run


def _fla_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     ctx: Mapping[str, Any]) -> Callable[[], Any]:
    """fla's ``chunk_linear_attn``, unnormalized, no feature map (= lightning without decay)."""
    from fla.ops.linear_attn import chunk_linear_attn

    qt, kt, vt = _token_major(q, k, v)

    def run() -> torch.Tensor:
        return chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=False)[0].transpose(1, 2)

    run.leaves = [qt, kt, vt]
    return run


def _natten_na1d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                 ctx: Mapping[str, Any]) -> Callable[[], Any]:
    from natten.functional import na1d

    qt, kt, vt = _token_major(q, k, v)  # (B, N, H, D)
    kernel = _odd_at_most(ctx["N"] // 2, 127)

    def run() -> torch.Tensor:
        return na1d(qt, kt, vt, kernel_size=kernel, is_causal=causal).transpose(1, 2)

    run.leaves = [qt, kt, vt]
    return run


def _flex_sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         ctx: Mapping[str, Any]) -> Callable[[], Any]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    window = min(1024, ctx["N"])

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 (FlexAttention's signature)
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(mask_mod, None, None, ctx["N"], ctx["N"], device=str(q.device))
    compiled = torch.compile(flex_attention, dynamic=False)

    def run() -> torch.Tensor:
        return compiled(q, k, v, block_mask=block_mask)

    return run


EXTERNALS: tuple[ExternalBaseline, ...] = (
    ExternalBaseline("fla:chunk_simple_gla", "fla", "fla.ops.simple_gla", ("cuda",), True, _fla_simple_gla,
                     "flash-linear-attention, Lightning attention with per-head decay"),
    ExternalBaseline("fla:chunk_linear_attn", "fla", "fla.ops.linear_attn", ("cuda",), True, _fla_linear_attn,
                     "flash-linear-attention, unnormalized linear attention"),
    ExternalBaseline("natten:na1d", "natten", "natten.functional", ("cuda", "cpu"), False, _natten_na1d,
                     "NATTEN neighborhood attention, kernel 127"),
    ExternalBaseline("flex:sliding_window", "flex", "torch.nn.attention.flex_attention", ("cuda",), True,
                     _flex_sliding_window, "FlexAttention (compiled), causal sliding window 1024"),
)


def available_externals(wanted: Sequence[str], device: str, *,
                        report: Callable[[str], None] = print) -> list[ExternalBaseline]:
    """The external baselines of the ``wanted`` packages that import and run on ``device``.

    Each missing package (or unsupported device) is reported once through ``report``.
    """
    import importlib

    out, reported = [], set()
    for ext in EXTERNALS:
        if ext.package not in wanted:
            continue
        if device not in ext.devices:
            if ext.package not in reported:
                report(f"external baseline {ext.package!r}: runs on {', '.join(ext.devices)} only, not {device}")
                reported.add(ext.package)
            continue
        try:
            importlib.import_module(ext.module)
        except Exception as error:  # ImportError, or a package that fails while importing
            if ext.package not in reported:
                report(f"external baseline {ext.package!r} not available ({type(error).__name__}: {error}); "
                       f"install it to add it to the table")
                reported.add(ext.package)
            continue
        out.append(ext)
    return out


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cell_spec(*, mechanism: str, impl: str, path: str, N: int, mode: str, causal: bool, batch: int, heads: int,
               dim: int, dtype: str, device: str, seed: int) -> dict[str, Any]:
    return {"mechanism": mechanism, "impl": impl, "path": path, "N": N, "mode": mode, "causal": causal,
            "batch": batch, "heads": heads, "dim": dim, "dtype": dtype, "device": device, "seed": seed}


def build_cell(spec: Mapping[str, Any], *, externals: Sequence[ExternalBaseline] = ()) -> Callable[[], Any]:
    """Random inputs for ``spec`` and a function running one call (forward, or forward + backward).

    Returns the call; building it allocates the inputs (so memory helpers count them).
    """
    device = torch.device(spec["device"])
    dtype = _DTYPES[spec["dtype"]]
    B, H, N, D = spec["batch"], spec["heads"], spec["N"], spec["dim"]
    backward = spec["mode"] == "fwdbwd"
    g = torch.Generator().manual_seed(spec["seed"])
    ctx = {"batch": B, "heads": H, "N": N, "dim": D, "device": device, "dtype": dtype}

    def draw(*shape: int, grad: bool = backward) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    if spec["path"] == "external":
        ext = next((e for e in (externals or EXTERNALS) if e.name == spec["mechanism"]), None)
        if ext is None:
            raise KeyError(f"unknown external baseline {spec['mechanism']!r}")
        q, k, v = draw(B, H, N, D), draw(B, H, N, D), draw(B, H, N, D)
        call = ext.build(q, k, v, spec["causal"], ctx)
        leaves = [q, k, v, *getattr(call, "leaves", [])]
    elif spec["path"] == "layer":
        record = attnlab.get(spec["mechanism"])
        layer_options = bench_options(record, ctx) if record.name in BENCH_OPTIONS else {}
        accepted = inspect.signature(record.layer).parameters
        for name in ("seq_len", "max_len", "max_seq_len"):  # layers sized for a fixed length
            if name in accepted and name not in layer_options:
                layer_options[name] = N
        layer = record.layer(H * D, H, causal=spec["causal"], **layer_options).to(device, dtype)
        x = draw(B, N, H * D)  # (B, N, dim)

        def call() -> Any:
            return layer(x)

        leaves = [x, *layer.parameters()]
    else:
        record = attnlab.get(spec["mechanism"])
        q, k, v = draw(B, H, N, D), draw(B, H, N, D), draw(B, H, N, D)  # (B, H, N, D)
        options = bench_options(record, ctx)
        impl = spec["impl"]
        if impl != "reference":
            options["impl"] = impl

            def call() -> Any:
                return record(q, k, v, causal=spec["causal"], **options)
        else:
            def call() -> Any:
                return record.run_reference(q, k, v, causal=spec["causal"], **options)

        leaves = [q, k, v]

    if not backward:
        def forward() -> None:
            with torch.no_grad():
                call()

        return forward
    out_grad: list[torch.Tensor] = []

    def forward_backward() -> None:
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        if not out_grad:
            out_grad.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device, out.dtype))
        out.backward(out_grad[0])
        for leaf in leaves:
            leaf.grad = None

    return forward_backward


# --------------------------------------------------------------------------------------------------
# the runner


def _resolve(preset: str | SpeedConfig, overrides: Mapping[str, Any]) -> SpeedConfig:
    if isinstance(preset, SpeedConfig):
        config = preset
    else:
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not one of {', '.join(PRESETS)}")
        config = PRESETS[preset]
    fields = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(fields) - set(asdict(config))
    if unknown:
        raise TypeError(f"unknown speed benchmark option(s): {', '.join(sorted(unknown))}")
    for name in ("lengths", "modes", "impls", "externals"):
        if name in fields:
            fields[name] = tuple(fields[name])
    config = replace(config, **fields)
    if config.device is not None and config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} but no CUDA device is available (the 'gpu' preset needs one; "
                         f"use --preset cpu here)")
    if config.device is None:
        config = replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
    bad_modes = [m for m in config.modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"modes={list(config.modes)}: {bad_modes} not in {list(MODES)}")
    if config.dtype not in _DTYPES:
        raise ValueError(f"dtype={config.dtype!r} is not one of {', '.join(_DTYPES)}")
    if not config.lengths or min(config.lengths) < 1:
        raise ValueError(f"lengths must be positive integers, got {list(config.lengths)}")
    if config.memory not in ("subprocess", "inline", "none", "cuda"):
        raise ValueError(f"memory={config.memory!r} is not one of 'subprocess', 'inline', 'none', 'cuda'")
    return replace(config, lengths=tuple(sorted(set(config.lengths))))


def _memory_limit_bytes(config: SpeedConfig) -> int:
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


def _select(mechanisms: Sequence[str] | str | None) -> list[Mechanism]:
    if mechanisms is None:
        return [m for m in attnlab.mechanisms()]
    names = [n.strip() for n in mechanisms.split(",")] if isinstance(mechanisms, str) else list(mechanisms)
    return [attnlab.get(n) for n in names if n]


@dataclass
class _Series:
    """Measured points of one (mechanism, impl, path, mode) series, for the skip predictions."""

    lengths: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    memory_lengths: list[int] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)


def _plan(records: Sequence[Mechanism], config: SpeedConfig, externals: Sequence[ExternalBaseline],
          say: Callable[[str], None]) -> list[tuple[str, str, str, bool, Mechanism | None]]:
    """(name, impl, path, causal, record) per series; layer-only records run through their layer."""
    plan = []
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
        for impl in config.impls:
            if impl == "all":
                impls += ["auto", *record.impls]
            elif impl == "auto" or impl == "reference" or impl in record.impls:
                impls.append(impl)
        for impl in dict.fromkeys(impls):
            plan.append((record.name, impl, "op", causal, record))
    for ext in externals:
        plan.append((ext.name, "external", "external", True if ext.causal_only else config.causal, None))
    return plan


def run_speed_benchmark(*, preset: str | SpeedConfig = "cpu", out_dir: str | os.PathLike[str],
                        mechanisms: Sequence[str] | str | None = None, resume: bool = True,
                        say: Callable[[str], None] | None = None, write_report: bool = True,
                        **overrides: Any) -> list[dict[str, Any]]:
    """Run the sweep of ``preset`` (overridden by ``overrides``, fields of :class:`SpeedConfig`).

    Every (mechanism, impl, N, mode) cell appends one row to ``out_dir/speed.jsonl``; softmax
    attention (SDPA, impl "auto") is timed for every (N, mode, causal) in the same run and each row
    carries ``time_ratio`` and ``memory_ratio`` to it. With ``resume`` (default) cells already in the
    file are not run again. Returns the rows of this sweep (loaded or new), and writes
    ``speed.md`` / ``speed.html`` (table and log-log plots) unless ``write_report=False``.
    """
    config = _resolve(preset, overrides)
    say = say or print
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, preset, out_dir, mechanisms, resume, say, write_report)
    finally:
        torch.set_num_threads(threads)


def _run(config: SpeedConfig, preset: str | SpeedConfig, out_dir: str | os.PathLike[str],
         mechanisms: Sequence[str] | str | None, resume: bool, say: Callable[[str], None],
         write_report: bool) -> list[dict[str, Any]]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    existing = {result_key(r, KEY_FIELDS): r for r in load_results(path) if r.get("kind") == "speed"} if resume else {}
    records = _select(mechanisms)
    externals = available_externals(config.externals, torch.device(config.device).type, report=say)
    plan = _plan(records, config, externals, say)
    limit = _memory_limit_bytes(config)
    stamp = {**versions(), "device_name": _device_name(config.device)}
    baseline = attnlab.get(BASELINE)
    rows: list[dict[str, Any]] = []
    series: dict[tuple[str, str, str, str], _Series] = {}
    baselines: dict[tuple[int, str, bool], dict[str, Any]] = {}
    start = time.perf_counter()

    def cell(name: str, impl: str, path_kind: str, causal: bool, record: Mechanism | None, N: int,
             mode: str) -> dict[str, Any]:
        spec = _cell_spec(mechanism=name, impl=impl, path=path_kind, N=N, mode=mode, causal=causal,
                          batch=config.batch_for(N), heads=config.heads, dim=config.dim, dtype=config.dtype,
                          device=config.device, seed=config.seed)
        row = {"kind": "speed", **spec, "family": record.family if record else "external",
               "complexity": record.complexity if record else "",
               "preset": preset if isinstance(preset, str) else "custom"}
        key = result_key(row, KEY_FIELDS)
        s = series.setdefault((name, impl, path_kind, mode), _Series())
        if key in existing and existing[key].get("status") in ("ok", "skipped"):
            done = existing[key]
            if done.get("status") == "ok":
                s.lengths.append(N)
                s.times.append(done["time_ms"])
                if done.get("peak_bytes"):
                    s.memory_lengths.append(N)
                    s.memory.append(done["peak_bytes"])
            return done
        ctx = {"batch": spec["batch"], "heads": config.heads, "N": N, "dim": config.dim,
               "device": torch.device(config.device), "dtype": _DTYPES[config.dtype]}
        if record is not None and path_kind == "op":
            try:
                row["options"] = _describe(bench_options(record, ctx))
            except Exception as error:  # an option builder that does not fit: recorded as the cell's error
                row["options"] = {"error": str(error)}
        exponent = complexity_exponent(record, impl) if record else 1.0
        dtype_bytes = torch.finfo(_DTYPES[config.dtype]).bits // 8
        mem_estimate = predict_next(s.memory_lengths, s.memory, N, default_exponent=exponent) if s.memory else None
        basis = f"extrapolated from N={s.memory_lengths[-1]}" if s.memory else "analytic"
        if mem_estimate is None:
            mem_estimate = estimate_cell(batch=spec["batch"], heads=config.heads, length=N, dim=config.dim,
                                         dtype_bytes=dtype_bytes, mode=mode, exponent=exponent)
            if mem_estimate > limit and (config.device.startswith("cuda") or config.memory == "subprocess"):
                # the formula is a worst case: measure a short probe (where memory is measured reliably)
                mem_estimate, basis = _probe_estimate(spec, exponent, externals, fallback=(mem_estimate, basis))
        time_estimate = predict_next(s.lengths, s.times, N, default_exponent=exponent)
        row["estimate_bytes"] = int(mem_estimate)
        row["estimate_basis"] = basis
        row["estimate_ms"] = time_estimate
        if mem_estimate > limit:
            row.update(status="skipped", reason=f"estimated peak {mem_estimate / 2**30:.2f} GiB ({basis}) > limit "
                                                 f"{limit / 2**30:.2f} GiB")
        elif (time_estimate is not None and time_estimate > config.max_cell_seconds * 1e3
              and not (name == BASELINE and impl == "auto")):  # the baseline of the ratios always runs
            row.update(status="skipped", reason=f"estimated {time_estimate / 1e3:.1f} s per call > limit "
                                                 f"{config.max_cell_seconds:g} s")
        else:
            try:
                row.update(_measure(spec, config, externals))
                row["status"] = "ok"
                s.lengths.append(N)
                s.times.append(row["time_ms"])
                if row.get("peak_bytes"):
                    s.memory_lengths.append(N)
                    s.memory.append(row["peak_bytes"])
            except Exception as error:  # a cell that fails is recorded, not fatal
                row.update(status="error", reason=f"{type(error).__name__}: {str(error).strip()[:300]}")
                if isinstance(error, torch.OutOfMemoryError) and config.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        row.update(stamp, timestamp=datetime.now(UTC).isoformat(timespec="seconds"))
        append_result(path, row)
        return row

    # Softmax first at every (N, mode, causal) that the plan needs: the baseline of the ratios.
    # Shortest lengths first, so that an interrupted run has every mechanism at the short lengths.
    causal_kinds = sorted({causal for (_, _, _, causal, _) in plan}, reverse=True)
    for N in config.lengths:
        for mode in config.modes:
            for causal in causal_kinds:
                baselines[(N, mode, causal)] = cell(BASELINE, "auto", "op", causal, baseline, N, mode)
            for name, impl, path_kind, causal, record in plan:
                if name == BASELINE and impl == "auto" and path_kind == "op":
                    row = baselines[(N, mode, causal)]
                else:
                    row = cell(name, impl, path_kind, causal, record, N, mode)
                row = dict(row)
                _attach_ratios(row, baselines[(N, mode, causal)])
                rows.append(row)
                say(_line(row))
    if not any(name == BASELINE and impl == "auto" and kind == "op" for name, impl, kind, _, _ in plan):
        for base in baselines.values():  # the baseline is part of the table even when not asked for
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
    if write_report:
        from attnlab.bench.speed_report import write_speed_report

        for written in write_speed_report(out):
            say(f"wrote {written}")
    return rows


def _probe_estimate(spec: Mapping[str, Any], exponent: float, externals: Sequence[ExternalBaseline], *,
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


def _attach_ratios(row: dict[str, Any], base: Mapping[str, Any]) -> None:
    ok = row.get("status") == "ok" and base.get("status") == "ok"
    row["baseline_time_ms"] = base.get("time_ms")
    row["baseline_peak_bytes"] = base.get("peak_bytes")
    row["time_ratio"] = row["time_ms"] / base["time_ms"] if ok and base.get("time_ms") else None
    row["memory_ratio"] = (row["peak_bytes"] / base["peak_bytes"]
                           if ok and row.get("peak_bytes") and base.get("peak_bytes") else None)


def _line(row: Mapping[str, Any]) -> str:
    head = f"{row['mechanism']:>24s} {row['impl']:>9s} {row['mode']:>6s} N={row['N']:<6d}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}: {row.get('reason')}"
    mem = f"{row['peak_bytes'] / 2**20:9.1f} MiB" if row.get("peak_bytes") else "        - MiB"
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
            result["memory_method"] = "peak RSS of a fresh subprocess"
            # the child imports torch and attnlab first: slow on a loaded machine
            timeout = max(600.0, 20 * timing.median_ms / 1e3)
            result["peak_bytes"] = cpu_peak_memory_subprocess(spec, timeout=timeout)
        elif config.memory == "inline":
            result["memory_method"] = "peak RSS, same process (approximate)"
            result["peak_bytes"] = cpu_peak_memory_inline(lambda: build_cell(spec, externals=externals))
        else:
            result["memory_method"] = "none"
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:  # the timing stands without it
        result["memory_error"] = f"{type(error).__name__}: {str(error).strip()[:200]}"
    return result


def _memory_cell_main(spec_json: str) -> int:
    """Entry of the memory subprocess: build the cell, measure its peak RSS, print JSON."""
    spec = json.loads(spec_json)
    externals = [e for e in EXTERNALS if e.name == spec["mechanism"]]
    # a fresh process: the first call is the measured one (a warm-up would double a slow cell's cost)
    peak = cpu_peak_memory_inline(lambda: build_cell(spec, externals=externals), warmup=False)
    print(json.dumps({"peak_bytes": peak}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-cell":
        sys.exit(_memory_cell_main(sys.argv[2]))
    print("usage: attnlab bench speed --help  (this module's own entry only serves --memory-cell)", file=sys.stderr)
    sys.exit(2)
