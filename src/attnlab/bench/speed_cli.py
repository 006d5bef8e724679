"""``attnlab bench speed``: the speed and memory benchmark from the command line."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands", "cmd_bench_speed", "cmd_softmax_backends"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from attnlab.bench.speed import run_speed_benchmark
    from attnlab.bench.speed_config import PRESETS

    if args.list_presets:
        for name, config in PRESETS.items():
            print(f"{name}: {config}")
        return 0
    overrides: dict[str, Any] = {
        "lengths": args.lengths, "batch": args.batch, "heads": args.heads, "dim": args.dim, "dtype": args.dtype,
        "modes": args.mode, "impls": args.impls, "memory": args.memory, "device": args.device,
        "memory_limit_gb": args.memory_limit_gb, "max_cell_seconds": args.max_cell_seconds,
        "externals": args.externals, "tokens": args.tokens, "threads": args.threads,
    }
    if args.bidirectional:
        overrides["causal"] = False
    out = args.out or f"runs/speed-{args.preset}"
    if args.softmax_backends:
        return cmd_softmax_backends(args.preset, overrides, out)
    try:
        rows = run_speed_benchmark(preset=args.preset, out_dir=out, mechanisms=args.mechanisms,
                                   resume=not args.no_resume, **overrides)
    except (KeyError, ValueError, TypeError) as error:
        print(f"error: {error.args[0] if error.args else error}")
        return 2
    failed = [r for r in rows if r.get("status") == "error"]
    print(f"{len(rows)} cells, {len(failed)} failed; results in {out}/speed.jsonl, table in {out}/speed.md")
    return 0


def cmd_softmax_backends(preset: str, overrides: dict[str, Any], out: str) -> int:
    """Time every SDPA backend at the sweep's shapes (``--softmax-backends``): the table, next to the
    order that ``softmax_attention(impl="auto")`` uses by its fixed rule. Rows in OUT/softmax_backends.jsonl."""
    import json
    from pathlib import Path

    from attnlab.bench.softmax_backends import measure_softmax_backends
    from attnlab.bench.speed_config import DTYPES, resolve_config

    try:
        config = resolve_config(preset, overrides)
    except (ValueError, TypeError) as error:
        print(f"error: {error.args[0] if error.args else error}")
        return 2
    path = Path(out) / "softmax_backends.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as results:
        for N in config.lengths:
            for mode in config.modes:
                table = measure_softmax_backends(
                    device=config.device, dtype=DTYPES[config.dtype], batch=config.batch_for(N), heads=config.heads,
                    length=N, head_dim=config.dim, mask_kind="causal" if config.causal else "none", mode=mode,
                    warmup=config.warmup, repeats=config.repeats, seed=config.seed)
                results.write(json.dumps({"N": N, **table.as_dict()}) + "\n")
                times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in table.times_ms.items())
                refused = f"; refused: {', '.join(table.errors)}" if table.errors else ""
                print(f"N={N} {mode} {config.dtype} D={config.dim}: {times}{refused}; fastest {table.fastest}; "
                      f"impl='auto' order: {' > '.join(table.rule_order) or 'SDPA default'}")
    print(f"results in {path}")
    return 0


def add_commands(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``attnlab bench speed`` (``sub`` is unused: no top-level command of its own)."""
    p = bench.add_parser("speed", help="time and peak memory per mechanism x length x mode, as ratios to SDPA",
                         description="Time and peak memory of every registered mechanism (or --mechanisms) "
                                     "versus sequence length, with softmax attention (SDPA) timed in the same "
                                     "run; JSON lines in OUT/speed.jsonl (resumable), tables and log-log plots "
                                     "in OUT/speed.md, OUT/speed.html.")
    p.add_argument("--preset", default="cpu", help="smoke | demo | cpu | gpu (default cpu)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--mechanisms", default=None, help="comma-separated registered names (default: all)")
    p.add_argument("--lengths", type=_ints, default=None, help="e.g. 256,1024,4096,16384")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="constant tokens per call (B = tokens // N)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=None, help="head dim D")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--mode", type=_names, default=None, help="fwd,fwdbwd")
    p.add_argument("--impls", type=_names, default=None, help="auto (default), reference, a fast path, or all")
    p.add_argument("--bidirectional", action="store_true", help="time the bidirectional forms (default causal)")
    p.add_argument("--memory", default=None, help="subprocess | inline | none (CPU); GPU uses the CUDA allocator")
    p.add_argument("--memory-limit-gb", type=float, default=None, help="skip cells estimated above this")
    p.add_argument("--max-cell-seconds", type=float, default=None, help="skip cells predicted slower per call")
    p.add_argument("--externals", type=_names, default=None, help="external baselines to try: fla,natten,flex")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads during the sweep")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (default runs/speed-PRESET)")
    p.add_argument("--no-resume", action="store_true", help="run every cell again even if already in the file")
    p.add_argument("--softmax-backends", action="store_true",
                   help="instead of the sweep, time each SDPA backend at its shapes (what impl='auto' never does)")
    p.set_defaults(func=cmd_bench_speed)
