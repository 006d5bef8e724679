"""One prepared GPU run: correctness of every registered op on CUDA, then timings at the anchor shape.

Run through ``scripts/gpu_check.sh`` (sets PYTHONPATH, installs an ``fla-core`` wheel found beside
the script, offline). Steps:

1. every registered op on the device against its reference (float64 oracle): float32 forward and
   gradients, bfloat16 forward at the record's realistic bf16 size; one PASS/FAIL line each (layer-
   only mechanisms: the layer in float32 against the same layer in float64);
2. forward and forward+backward times (``triton.testing.do_bench`` medians, 25 ms warm-up, 100 ms
   repeat, a ones output gradient), peak memory and relative error at the anchor shape
   (bf16, H=16, D=128, 65,536 tokens per call, causal, N = 1024 ..
   65536) for softmax (each SDPA backend, SDPA's default, and ``impl="auto"``), lightning, linear,
   neighborhood and sliding window (window 1024; ``impl="auto"`` is compiled FlexAttention on CUDA,
   with the sliding window's "gather" path beside it), FlashBias (causal ALiBi) and, when importable,
   flash-linear-attention's ``chunk_simple_gla`` / ``chunk_linear_attn``;
3. one table with ratios to the anchors (``ours / anchor``: below 1 is faster), written with every
   number to ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.

``--device cpu --quick`` runs the same code paths at tiny sizes (the test suite does).
A time budget (``--budget-s``, default 440 s) skips what is left, said in the table, rather than
overrunning the 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import attnlab  # noqa: E402
from attnlab.bench.timing import time_callable  # noqa: E402
from attnlab.ops.flex import auto_uses_flex  # noqa: E402
from attnlab.ops.softmax_backends import sdpa_with_backend, softmax_backend_report  # noqa: E402
from attnlab.testing import first_output, random_qkv, relative_error, run_options  # noqa: E402

# the anchors of docs/benchmarks.md, measured 2026-11-28 on one H200: (fwd ms, fwd+bwd ms) per N
ANCHORS: dict[str, dict[int, tuple[float, float]]] = {
    "SDPA FlashAttention-2": {1024: (1.033, 4.940), 4096: (3.378, 13.609), 16384: (12.903, 47.775),
                              65536: (52.206, 188.380)},
    "SDPA cuDNN": {1024: (0.624, 2.670), 4096: (2.038, 7.706), 16384: (7.588, 27.217), 65536: (29.196, 108.485)},
    "fla chunk_simple_gla": {1024: (0.730, 3.353), 4096: (0.753, 3.407), 16384: (0.731, 3.430),
                             65536: (1.022, 4.926)},
    "fla chunk_linear_attn": {1024: (0.722, 3.251), 4096: (0.741, 3.338), 16384: (0.748, 3.424),
                              65536: (0.883, 3.871)},
    "Flex sliding window 1024": {16384: (1.675, 6.143), 65536: (1.966, 8.112)},
    "FlashBias hi/lo cuDNN": {4096: (4.18, 12.57), 16384: (11.12, 38.94)},
}


@dataclass
class Shape:
    dtype: torch.dtype
    heads: int
    dim: int
    tokens: int
    lengths: tuple[int, ...]
    err_max_length: int  # relative error against the float64 reference up to this N (first batch element)


ANCHOR_SHAPE = Shape(torch.bfloat16, 16, 128, 65536, (1024, 4096, 16384, 65536), 4096)
QUICK_SHAPE = Shape(torch.float32, 2, 16, 256, (64, 128), 128)


@dataclass
class Entry:
    """One timed implementation: ``build(q, k, v) -> call`` and how to compute its reference."""

    label: str
    anchor: str | None
    build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]
    reference: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    flops: Callable[[int, int, int, int], float] | None = None  # (B, H, N, D) -> forward flops
    lengths: tuple[int, ...] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


def say(line: str = "") -> None:
    print(line, flush=True)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def _to(options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in options.items()}


# ----------------------------------------------------------------------------------------------
# 1. correctness


def check_op(record: attnlab.Mechanism, device: torch.device, causal: bool, seed: int) -> list[dict[str, Any]]:
    """float32 forward + gradients and bf16 forward of ``record`` on ``device`` vs its float64 reference."""
    out: list[dict[str, Any]] = []
    c = record.check
    mode = "causal" if causal else "bidirectional"
    g = torch.Generator().manual_seed(seed)
    # float32 forward and gradients
    q, k, v = (x.to(device) for x in random_qkv(record, dtype=torch.float32, generator=g))
    options = _to(run_options(record, causal=causal), device)
    tol = max(c.float32_tolerance * 10, 1e-4)
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    expected = first_output(record.run_reference(q64, k64, v64, **options))
    qg, kg, vg = (x.clone().requires_grad_(record.differentiable) for x in (q, k, v))
    got = first_output(record(qg, kg, vg, **options))
    out.append({"name": record.name, "mode": mode, "check": "float32 fwd", "error": relative_error(got, expected),
                "tolerance": tol})
    if record.differentiable:
        grad = torch.randn(expected.shape, generator=g, dtype=torch.float64).to(device)
        expected.backward(grad)
        got.backward(grad.to(got.dtype))
        err = max(relative_error(a.grad, b.grad) for a, b in ((qg, q64), (kg, k64), (vg, v64)))
        out.append({"name": record.name, "mode": mode, "check": "float32 grad", "error": err,
                    "tolerance": max(tol, 1e-3)})
    # bf16 at the realistic size
    q, k, v = (x.to(device) for x in random_qkv(record, dtype=torch.bfloat16, generator=g, batch=1,
                                                length=c.bf16_length, head_dim=c.bf16_head_dim))
    options = _to(run_options(record, causal=causal, bf16=True), device)
    with torch.no_grad():
        got = first_output(record(q, k, v, **options))
        expected = first_output(record.run_reference(q.double(), k.double(), v.double(), **options))
    out.append({"name": record.name, "mode": mode, "check": f"bf16 fwd N={c.bf16_length}",
                "error": relative_error(got, expected), "tolerance": c.bf16_tolerance,
                "dtype_kept": got.dtype == torch.bfloat16})
    return out


def check_layer(record: attnlab.Mechanism, device: torch.device, seed: int) -> list[dict[str, Any]]:
    """A layer-only mechanism: float32 layer on ``device`` against the same weights in float64."""
    import inspect

    causal = record.supports_causal and not record.supports_bidirectional
    length = 64  # >= 49 agents of agent attention; a square grid (8 x 8) for 2-D layers
    options = {name: length for name in ("seq_len", "max_len", "max_seq_len")
               if name in inspect.signature(record.layer).parameters}
    torch.manual_seed(seed)
    layer = record.layer(64, 4, causal=causal, **options).to(device)
    layer64 = record.layer(64, 4, causal=causal, **options).to(device).double()
    layer64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    layer.eval()
    layer64.eval()
    x = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        got, expected = first_output(layer(x)), first_output(layer64(x.double()))
    return [{"name": record.name, "mode": "causal" if causal else "layer", "check": "float32 layer vs float64",
             "error": relative_error(got, expected), "tolerance": 1e-4}]


def run_correctness(device: torch.device, only: set[str] | None) -> list[dict[str, Any]]:
    say(f"== correctness on {device}: fast path vs float64 reference, fresh random inputs ==")
    results: list[dict[str, Any]] = []
    for i, record in enumerate(attnlab.mechanisms()):
        if only and record.name not in only:
            continue
        try:
            if record.op is None or record.reference is None:
                if record.role != "mixer" or record.layer is None:
                    say(f"SKIP  {record.name:18s} role {record.role!r}: no op and not a mixer layer")
                    continue
                rows = check_layer(record, device, seed=i)
            else:
                rows = []
                for causal in (True, False):
                    if (record.supports_causal if causal else record.supports_bidirectional):
                        rows += check_op(record, device, causal, seed=i)
        except Exception as error:  # one broken op must not stop the run
            rows = [{"name": record.name, "mode": "-", "check": "run", "error": math.inf, "tolerance": 0.0,
                     "exception": _short(error)}]
            traceback.print_exc(limit=2, file=sys.stdout)
        for row in rows:
            ok = row["error"] <= row["tolerance"] and row.get("dtype_kept", True) and math.isfinite(row["error"])
            row["ok"] = bool(ok)
            detail = row.get("exception") or f"rel. error {row['error']:.2e} (tolerance {row['tolerance']:.0e})"
            say(f"{'PASS' if ok else 'FAIL'}  {row['name']:18s} {row['mode']:13s} {row['check']:22s} {detail}")
            results.append(row)
    return results


# ----------------------------------------------------------------------------------------------
# 2. timings


def entries(shape: Shape, device: torch.device) -> list[Entry]:
    from attnlab.ops import softmax_attention

    out: list[Entry] = []
    names = {m.name for m in attnlab.mechanisms()}

    def causal_flops(B: int, H: int, N: int, D: int) -> float:
        return 2 * 2 * B * H * N * N * D / 2

    softmax = attnlab.get("softmax")
    ref_softmax = lambda q, k, v: softmax.run_reference(q, k, v, causal=True)  # noqa: E731
    for backend, anchor in (("flash", "SDPA FlashAttention-2"), ("cudnn", "SDPA cuDNN"),
                            ("efficient", "SDPA cuDNN"), ("default", "SDPA cuDNN")):
        out.append(Entry(f"softmax SDPA[{backend}]", anchor,
                         lambda q, k, v, b=backend: lambda: sdpa_with_backend(b, q, k, v, is_causal=True),
                         ref_softmax, causal_flops))
    out.append(Entry("softmax auto", "SDPA cuDNN", lambda q, k, v: lambda: softmax_attention(q, k, v, causal=True),
                     ref_softmax, causal_flops))

    if "lightning" in names:
        from attnlab.ops import lightning_decay_slopes

        lightning = attnlab.get("lightning")
        decay = lightning_decay_slopes(shape.heads).to(device)
        for impl in ("auto", *[i for i in lightning.impls if i not in ("recurrent", "reference")]):
            out.append(Entry(f"lightning {impl}", "fla chunk_simple_gla",
                             lambda q, k, v, i=impl: lambda: lightning(q, k, v, causal=True, decay=decay, impl=i),
                             lambda q, k, v: lightning.run_reference(q, k, v, causal=True, decay=decay)))
    if "linear" in names:
        linear = attnlab.get("linear")
        out.append(Entry("linear auto (elu+1, normalized)", "fla chunk_linear_attn",
                         lambda q, k, v: lambda: linear(q, k, v, causal=True),
                         lambda q, k, v: linear.run_reference(q, k, v, causal=True)))
        plain = {"feature_map": "identity", "normalize": False}
        out.append(Entry("linear auto (identity, unnormalized)", "fla chunk_linear_attn",
                         lambda q, k, v: lambda: linear(q, k, v, causal=True, **plain),
                         lambda q, k, v: linear.run_reference(q, k, v, causal=True, **plain)))
    window = min(1024, shape.lengths[0])
    # what impl="auto" of the local ops resolves to here: compiled FlexAttention on CUDA, "gather" on CPU
    local_auto = "flex" if auto_uses_flex(torch.empty(0, device=device, dtype=shape.dtype)) else "gather"
    if "sliding_window" in names:
        sw = attnlab.get("sliding_window")
        sw_ref = lambda q, k, v: sw.run_reference(q, k, v, causal=True, window=window)  # noqa: E731
        out.append(Entry(f"sliding_window auto={local_auto} (window {window})", "Flex sliding window 1024",
                         lambda q, k, v: lambda: sw(q, k, v, causal=True, window=window), sw_ref))
        if local_auto == "flex":  # the gathered path beside it, for the flex / gather ratio
            out.append(Entry(f"sliding_window gather (window {window})", "Flex sliding window 1024",
                             lambda q, k, v: lambda: sw(q, k, v, causal=True, window=window, impl="gather"),
                             sw_ref))
    if "neighborhood" in names:
        na = attnlab.get("neighborhood")
        out.append(Entry(f"neighborhood auto={local_auto} (causal, kernel {window})", "Flex sliding window 1024",
                         lambda q, k, v: lambda: na(q, k, v, causal=True, kernel_size=window),
                         lambda q, k, v: na.run_reference(q, k, v, causal=True, kernel_size=window)))
    if "flashbias" in names:
        from attnlab.ops import alibi_bias_factors

        fb = attnlab.get("flashbias")

        def flashbias_build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
            qb, kb = alibi_bias_factors(q.shape[1], q.shape[2], dtype=q.dtype, device=q.device)
            return lambda: fb(q, k, v, causal=True, q_bias=qb, k_bias=kb)

        def flashbias_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            qb, kb = alibi_bias_factors(q.shape[1], q.shape[2], dtype=torch.float64, device=q.device)
            return fb.run_reference(q, k, v, causal=True, q_bias=qb, k_bias=kb)

        out.append(Entry("flashbias auto (causal ALiBi)", "FlashBias hi/lo cuDNN", flashbias_build, flashbias_ref))
    try:
        import fla.ops.linear_attn  # noqa: F401
        import fla.ops.simple_gla  # noqa: F401

        from attnlab.bench.externals import _fla_linear_attn, _fla_simple_gla

        ctx = {"heads": shape.heads, "device": device}
        lightning_ref = None
        if "lightning" in names:
            from attnlab.ops import lightning_decay_slopes

            def lightning_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                decay = lightning_decay_slopes(shape.heads).to(q.device)
                return attnlab.get("lightning").run_reference(q, k, v, causal=True, decay=decay)
        linear_ref = None
        if "linear" in names:
            def linear_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return attnlab.get("linear").run_reference(q, k, v, causal=True, feature_map="identity",
                                                           normalize=False)
        out.append(Entry("fla chunk_simple_gla", "fla chunk_simple_gla",
                         lambda q, k, v: _fla_simple_gla(q, k, v, True, ctx), lightning_ref))
        out.append(Entry("fla chunk_linear_attn", "fla chunk_linear_attn",
                         lambda q, k, v: _fla_linear_attn(q, k, v, True, ctx), linear_ref))
        say(f"fla found: {getattr(sys.modules.get('fla'), '__version__', '?')}")
    except Exception as error:
        say(f"fla not available ({_short(error)}): its rows are left out")
    # most telling first, should the time budget run out: each fla row right after the op it anchors
    order = ("softmax", "lightning", "fla chunk_simple_gla", "linear", "fla chunk_linear_attn", "sliding_window",
             "neighborhood", "flashbias")
    return sorted(out, key=lambda e: next((i for i, p in enumerate(order) if e.label.startswith(p)), len(order)))


def _memory_gib(device: torch.device, run: Callable[[], None]) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def time_entry(entry: Entry, N: int, shape: Shape, device: torch.device, *, quick: bool) -> dict[str, Any]:
    B = max(1, shape.tokens // N)
    gen = torch.Generator(device=device).manual_seed(N)
    q, k, v = (torch.randn(B, shape.heads, N, shape.dim, generator=gen, device=device, dtype=shape.dtype)
               for _ in range(3))
    row: dict[str, Any] = {"label": entry.label, "N": N, "B": B, "anchor": entry.anchor}
    timing = dict(warmup=1, repeats=2, max_repeats=2, min_seconds=0.0) if quick else {}
    try:
        with torch.no_grad():
            call = entry.build(q, k, v)
            out = first_output(call())
        row["fwd_ms"] = time_callable(call, device=device, **timing).median_ms
        if entry.flops is not None:
            row["tflops_fwd"] = entry.flops(B, shape.heads, N, shape.dim) / (row["fwd_ms"] * 1e-3) / 1e12
        if entry.reference is not None and N <= shape.err_max_length:
            with torch.no_grad():
                expected = entry.reference(q[:1].double(), k[:1].double(), v[:1].double())
            if expected is not None:
                row["rel_err"] = relative_error(out[:1], first_output(expected))
            del expected
        del out
    except Exception as error:
        row["error"] = _short(error)
        return row
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    del q, k, v
    try:
        call = entry.build(qg, kg, vg)
        leaves = [qg, kg, vg, *getattr(call, "leaves", [])]  # builders that re-lay the inputs list theirs
        ones: list[torch.Tensor] = []

        def fwd_bwd() -> None:
            o = first_output(call())
            if not ones:
                ones.append(torch.ones_like(o))
            o.backward(ones[0])
            for leaf in leaves:
                leaf.grad = None

        fwd_bwd()
        row["fwdbwd_ms"] = time_callable(fwd_bwd, device=device, **timing).median_ms
        row["peak_gib"] = _memory_gib(device, fwd_bwd)
    except Exception as error:
        row["error_bwd"] = _short(error)
    anchor = ANCHORS.get(entry.anchor or "", {}).get(N)
    if anchor is not None:
        row["anchor_fwd_ms"], row["anchor_fwdbwd_ms"] = anchor
        if "fwd_ms" in row:
            row["fwd_ratio"] = row["fwd_ms"] / anchor[0]
        if "fwdbwd_ms" in row:
            row["fwdbwd_ratio"] = row["fwdbwd_ms"] / anchor[1]
    return row


def run_timings(shape: Shape, device: torch.device, *, quick: bool, deadline: float,
                on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Time every entry at every length; ``on_row(rows)`` after each row (the outputs are rewritten)."""
    say(f"== timings on {device}: {str(shape.dtype).removeprefix('torch.')}, H={shape.heads}, D={shape.dim}, "
        f"{shape.tokens} tokens per call, causal ==")
    rows: list[dict[str, Any]] = []
    for entry in entries(shape, device):
        for N in entry.lengths or shape.lengths:
            if time.monotonic() > deadline:
                rows.append({"label": entry.label, "N": N, "B": max(1, shape.tokens // N), "anchor": entry.anchor,
                             "error": "skipped: time budget spent"})
                continue
            start = time.monotonic()
            row = time_entry(entry, N, shape, device, quick=quick)
            row["seconds"] = time.monotonic() - start
            rows.append(row)
            say(format_row(row))
            on_row(rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def format_row(row: dict[str, Any]) -> str:
    if "fwd_ms" not in row:
        return f"{row['label']:40s} N={row['N']:<6d} {row.get('error', '')}"
    return (f"{row['label']:40s} N={row['N']:<6d} fwd {row['fwd_ms']:9.3f} ms  fwd+bwd "
            f"{_f(row.get('fwdbwd_ms'), '9.3f')} ms  x{_f(row.get('fwd_ratio'), '.2f')} / "
            f"x{_f(row.get('fwdbwd_ratio'), '.2f')} anchor  err {_f(row.get('rel_err'), '.1e')}"
            + (f"  bwd: {row['error_bwd']}" if row.get("error_bwd") else ""))


def table(rows: list[dict[str, Any]]) -> str:
    header = ("| implementation | N | B | fwd ms | fwd+bwd ms | TFLOP/s fwd | peak GiB (fwd+bwd) | rel. err | "
              "anchor | anchor fwd / fwd+bwd ms | ratio fwd | ratio fwd+bwd |")
    lines = [header, "|" + "---|" * 12]
    for r in sorted(rows, key=lambda r: (r["N"], r["label"])):
        if "fwd_ms" not in r:
            lines.append(f"| {r['label']} | {r['N']} | {r['B']} | {r.get('error', '')} |||||||||")
            continue
        anchor = (f"{r['anchor_fwd_ms']:.3f} / {r['anchor_fwdbwd_ms']:.3f}" if "anchor_fwd_ms" in r else "–")
        lines.append(
            f"| {r['label']} | {r['N']} | {r['B']} | {r['fwd_ms']:.3f} | {_f(r.get('fwdbwd_ms'), '.3f')}"
            + (f" ({r['error_bwd']})" if r.get("error_bwd") else "")
            + f" | {_f(r.get('tflops_fwd'), '.0f')} | {_f(r.get('peak_gib'), '.2f')} | {_f(r.get('rel_err'), '.1e')}"
            f" | {r.get('anchor') or '–'} | {anchor} | {_f(r.get('fwd_ratio'), '.2f')} | "
            f"{_f(r.get('fwdbwd_ratio'), '.2f')} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
                           "python": platform.python_version(), "attnlab": attnlab.__version__,
                           "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        env["fla"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU test of the same code paths)")
    parser.add_argument("--out", default=None, help="folder for gpu_check.json / .md (default $OUT, else runs/)")
    parser.add_argument("--budget-s", type=float, default=440.0, help="stop timing after this many seconds")
    parser.add_argument("--only", default=None, help="comma-separated mechanism names for the correctness part")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-timings", action="store_true")
    args = parser.parse_args(argv)
    start = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        say("no CUDA device: run with --device cpu --quick to exercise the script on a CPU")
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    say("attnlab gpu_check " + json.dumps(env))
    only = set(args.only.split(",")) if args.only else None
    correctness = [] if args.skip_correctness else run_correctness(device, only)
    failed = [r for r in correctness if not r["ok"]]
    say(f"correctness: {len(correctness) - len(failed)} passed, {len(failed)} failed "
        f"({time.monotonic() - start:.0f} s)")
    shape = QUICK_SHAPE if args.quick else ANCHOR_SHAPE

    def write(timings: list[dict[str, Any]], *, final: bool) -> list[str]:
        """Write gpu_check.json / .md (after every timing row too: a run stopped from outside keeps them)."""
        report = {"environment": env, "correctness": correctness, "timings": timings, "complete": final,
                  "softmax_backends": softmax_backend_report(), "elapsed_s": time.monotonic() - start,
                  "shape": {"dtype": str(shape.dtype).removeprefix("torch."), "heads": shape.heads,
                            "dim": shape.dim, "tokens": shape.tokens, "lengths": list(shape.lengths),
                            "causal": True}}
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        markdown = [
            f"GPU check {env['date']} on {env.get('gpu', device)} (torch {env['torch']}, triton {env['triton']}, "
            f"fla {env['fla']}): {report['shape']['dtype']}, H={shape.heads}, D={shape.dim}, {shape.tokens} tokens "
            f"per call (B = {shape.tokens} / N), causal; do_bench medians; ratio = ours / anchor (below 1 = faster "
            f"than the anchor)." + ("" if final else " PARTIAL: the run had not finished when this was written."),
            "", table(timings), "",
            "SDPA backends tried by softmax_attention(impl=\"auto\"), by its fixed rule: "
            + "; ".join(f"{r['dtype']} D={r['head_dim']} {r['mask_kind']}: {' > '.join(r['order']) or 'default'}"
                        for r in report["softmax_backends"]),
            "", f"correctness: {len(correctness) - len(failed)} passed, {len(failed)} failed"
            + "".join(f"\n- FAIL {r['name']} {r['mode']} {r['check']}: {r.get('exception') or r['error']}"
                      for r in failed)]
        (out_dir / "gpu_check.md").write_text("\n".join(markdown) + "\n")
        return markdown

    write([], final=False)
    timings = [] if args.skip_timings else run_timings(shape, device, quick=args.quick,
                                                       deadline=start + args.budget_s,
                                                       on_row=lambda rows: write(rows, final=False))
    markdown = write(timings, final=True)
    say("")
    say("\n".join(markdown))
    say(f"\nwrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'} in {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
