"""``attnlab bench speed``: the speed and memory benchmark from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "cmd_bench_speed", "cmd_softmax_backends"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# the option named in each refusal of ``resolve_config`` (its messages start with the field's name)
_FIELD_OPTIONS = {"preset": "--preset", "device": "--device", "modes": "--mode", "dtype": "--dtype",
                  "lengths": "--lengths", "memory": "--memory"}


def _check_arguments(args: argparse.Namespace) -> None:
    """Refusals that need nothing but the arguments: each a UsageError naming the option and the fix."""
    from attnlab.cli_errors import UsageError

    for option, value in (("--batch", args.batch), ("--tokens", args.tokens), ("--heads", args.heads),
                          ("--dim", args.dim), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"{option}={value}: must be a positive integer (or leave it out for the preset's)")
    for option, value in (("--memory-limit-gb", args.memory_limit_gb), ("--max-cell-seconds", args.max_cell_seconds)):
        if value is not None and not value > 0:
            raise UsageError(f"{option}={value}: must be > 0 (or leave it out for the preset's)")
    if args.mechanisms is not None and not _names(args.mechanisms):
        raise UsageError("--mechanisms is empty: nothing to time; give registered names (see `attnlab list`) "
                         "or leave it out for all")
    if args.impls is not None and not args.impls:
        raise UsageError("--impls is empty: nothing to time; give auto, reference, all or a fast path's name")
    if args.device is not None:
        kind, _, index = args.device.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
            raise UsageError(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; "
                                 "use --device cpu (or leave it out)")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a folder (new, or an earlier run's to resume)")


def _resolve(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """The sweep's configuration; the refusals of ``resolve_config`` as UsageErrors naming the option."""
    from attnlab.bench.speed_config import resolve_config
    from attnlab.cli_errors import UsageError

    try:
        return resolve_config(args.preset, overrides)
    except (ValueError, TypeError) as error:
        message = str(error.args[0] if error.args else error)
        field = message.split("=")[0].split(" ")[0]
        raise UsageError(f"{_FIELD_OPTIONS[field]}: {message}" if field in _FIELD_OPTIONS else message) from None


def _check_plan(args: argparse.Namespace, config: Any) -> None:
    """Refuse unknown mechanism and impl names, and a sweep with no cell to time, before timing anything."""
    import difflib

    from attnlab.bench.speed_plan import plan_series, select_mechanisms
    from attnlab.cli_errors import UsageError

    try:
        records = select_mechanisms(args.mechanisms)
    except KeyError as error:
        raise UsageError(f"--mechanisms: {error.args[0]}") from None
    known = {"auto", "reference", "all"} | {impl for record in records for impl in record.impls}
    for impl in config.impls:
        if impl not in known:
            close = difflib.get_close_matches(impl, sorted(known), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UsageError(f"--impls: {impl!r} is no impl of the chosen mechanisms; {hint}"
                             f"choose from {', '.join(sorted(known))}")
    skipped: list[str] = []
    if not plan_series(records, config, (), skipped.append) and not config.externals:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise UsageError(f"--impls {','.join(config.impls)} with --mechanisms {args.mechanisms or 'all'}: 0 cells to "
                         f"time on {config.device}{why}; pick impls those mechanisms have (`attnlab list`)")


def cmd_bench_speed(args: argparse.Namespace) -> int:
    """Run the sweep. Every argument is checked before anything is timed; exit 1 when every cell failed."""
    if args.list_presets:
        from attnlab.bench.speed_config import PRESETS

        for name, config in PRESETS.items():
            print(f"{name}: {config}")
        return 0
    _check_arguments(args)  # before torch is even imported
    overrides: dict[str, Any] = {
        "lengths": args.lengths, "batch": args.batch, "heads": args.heads, "dim": args.dim, "dtype": args.dtype,
        "modes": args.mode, "impls": args.impls, "memory": args.memory, "device": args.device,
        "memory_limit_gb": args.memory_limit_gb, "max_cell_seconds": args.max_cell_seconds,
        "externals": args.externals, "tokens": args.tokens, "threads": args.threads,
    }
    if args.bidirectional:
        overrides["causal"] = False
    config = _resolve(args, overrides)
    out = args.out or f"runs/speed-{args.preset}"
    if args.softmax_backends:
        return cmd_softmax_backends(args.preset, overrides, out)
    _check_plan(args, config)
    from attnlab.bench.speed import run_speed_benchmark

    try:
        rows = run_speed_benchmark(preset=args.preset, out_dir=out, mechanisms=args.mechanisms,
                                   resume=not args.no_resume, **overrides)
    except KeyboardInterrupt:
        from attnlab.cli_errors import Interrupted

        raise Interrupted(f"interrupted; the cells timed so far are in {out}/speed.jsonl; rerun the same command "
                          "to resume (finished cells are skipped)") from None
    failed = [r for r in rows if r.get("status") == "error"]
    print(f"{len(rows)} cells, {len(failed)} failed; results in {out}/speed.jsonl, table in {out}/speed.md")
    if rows and len(failed) == len(rows):
        print(f"attnlab bench speed: every cell failed (first: {failed[0].get('reason')}); see {out}/speed.jsonl",
              file=sys.stderr)
        return 1
    return 0


def cmd_softmax_backends(preset: str, overrides: dict[str, Any], out: str) -> int:
    """Time every SDPA backend at the sweep's shapes (``--softmax-backends``): the table, next to the
    order that ``softmax_attention(impl="auto")`` uses by its fixed rule. Rows in OUT/softmax_backends.jsonl."""
    import json

    from attnlab.bench.softmax_backends import measure_softmax_backends
    from attnlab.bench.speed_config import DTYPES, resolve_config

    config = resolve_config(preset, overrides)  # refusals were raised as UsageErrors by cmd_bench_speed
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
    p.add_argument("--preset", default="cpu", help="smoke | demo | cpu | gpu")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--mechanisms", default=None, help="comma-separated registered names (None: all)")
    p.add_argument("--lengths", type=_ints, default=None, help="e.g. 256,1024,4096,16384 (None: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="batch size B (None: the preset's)")
    p.add_argument("--tokens", type=int, default=None, help="constant tokens per call (B = tokens // N)")
    p.add_argument("--heads", type=int, default=None, help="query heads H (None: the preset's)")
    p.add_argument("--dim", type=int, default=None, help="head dim D (None: the preset's)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (None: the preset's)")
    p.add_argument("--mode", type=_names, default=None, help="fwd,fwdbwd (None: the preset's)")
    p.add_argument("--impls", type=_names, default=None, help="auto, reference, a fast path, or all (None: auto)")
    p.add_argument("--bidirectional", action="store_true", help="time the bidirectional forms (else causal)")
    p.add_argument("--memory", default=None, help="subprocess | inline | none (CPU); GPU uses the CUDA allocator")
    p.add_argument("--memory-limit-gb", type=float, default=None, help="skip cells estimated above this")
    p.add_argument("--max-cell-seconds", type=float, default=None, help="skip cells predicted slower per call")
    p.add_argument("--externals", type=_names, default=None, help="external baselines to try: fla,natten,flex")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads during the sweep (None: torch's default, all cores: bench speed times "
                        "one cell at a time, so each cell gets the whole machine; bench quality instead runs one "
                        "thread per worker process)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (None: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (None: runs/speed-PRESET)")
    p.add_argument("--no-resume", action="store_true", help="run every cell again even if already in the file")
    p.add_argument("--softmax-backends", action="store_true",
                   help="instead of the sweep, time each SDPA backend at its shapes (what impl='auto' never does)")
    p.set_defaults(func=cmd_bench_speed)
