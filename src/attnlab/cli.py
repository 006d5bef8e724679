"""The ``attnlab`` command: list | check | demo | bench quality | bench speed | report | analyze.

``list`` and ``check`` live here; every other command's module adds its parsers through
``add_commands(sub, bench)`` and imports what its command needs only when that command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.table import Table

import attnlab
from attnlab.analysis import cli as analysis_cli
from attnlab.bench import quality_cli, report_cli, speed_cli
from attnlab.console import make_console
from attnlab.hf import eval_cli

__all__ = ["main", "build_parser"]


def options_text(record: attnlab.Mechanism) -> str:
    """``name=default`` for every option of the record's op (its layer when it has no op), required ones
    first as ``name=?``; ``impl`` lists the fast paths."""
    parts = [f"{name}=?" for name in record.required_options]
    for name, default in record.defaults.items():
        if name == "impl":
            parts.append(f"impl={default!r} ({'|'.join(('reference', *record.impls))})")
        else:
            parts.append(f"{name}={default!r}")
    return ", ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registry as a table, then each mechanism's options with their defaults."""
    console = make_console()
    table = Table(title=f"attnlab {attnlab.__version__}: {len(attnlab.mechanisms())} mechanisms")
    for column in ("name", "family", "causal", "bidir.", "kind", "complexity", "paper", "arXiv"):
        table.add_column(column, overflow="fold")
    options = Table(title="options (name=default; ?: required, no default)")
    for column in ("name", "options"):
        options.add_column(column, overflow="fold")
    for m in attnlab.mechanisms():
        kind = "op" if m.layer is None else ("op+layer" if m.op is not None else "layer")
        table.add_row(m.name, m.family, "yes" if m.supports_causal else "-",
                      "yes" if m.supports_bidirectional else "-", kind, m.complexity, m.paper, m.arxiv or "-")
        options.add_row(m.name, options_text(m))
    console.print(table)
    console.print(options)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Run each op once on random input against its reference; non-zero exit if any disagrees."""
    from attnlab.testing import check_mechanism

    console = make_console()
    try:
        records = [attnlab.get(n) for n in args.names] if args.names else attnlab.mechanisms()
    except KeyError as error:
        console.print(f"[red]{error.args[0]}[/red]")
        return 2
    table = Table(title="fast path (float32) vs reference (float64), random inputs")
    for column in ("mechanism", "mode", "rel. error", "tolerance", "time (ms)", "result"):
        table.add_column(column)
    failed = 0
    for record in records:
        if record.op is None or record.reference is None:
            table.add_row(record.name, "-", "-", "-", "-", "layer only (see tests)")
            continue
        modes = [c for c in (False, True) if (record.supports_causal if c else record.supports_bidirectional)]
        for causal in modes:
            result = check_mechanism(record, causal=causal, seed=args.seed)
            failed += not result.ok
            table.add_row(record.name, "causal" if causal else "bidirectional", f"{result.relative_error:.2e}",
                          f"{result.tolerance:.0e}", f"{result.seconds * 1e3:.2f}",
                          "[green]ok[/green]" if result.ok else "[red]DISAGREES[/red]")
    console.print(table)
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """What ``make demo`` runs: the quality benchmark's quick preset over the registered mechanisms on
    mqar, in-context regression and digits, a CPU speed sweep, then the report."""
    from attnlab.bench.demo import run_demo
    from attnlab.bench.presets import get_preset

    console = make_console()
    try:
        get_preset(args.preset)
    except KeyError as error:  # an unknown preset, refused before anything runs
        console.print(f"[red]{error.args[0]}[/red]")
        return 2
    cmd_list(args)
    return run_demo(preset=args.preset, out=args.out, console=console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"attnlab {attnlab.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the registered mechanisms as a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check", help="each mechanism's fast path against its reference")
    p.add_argument("names", nargs="*", help="mechanism names (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="the main job on the built-in default (what `make demo` runs)")
    p.add_argument("--preset", default="quick", help="quality preset: smoke | quick | standard | full (default quick)")
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<time>)")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="quality and speed benchmarks").add_subparsers(dest="bench_command",
                                                                                       required=True)
    # one line per command module: ``sub`` takes top-level commands, ``bench`` those under ``attnlab bench``
    quality_cli.add_commands(sub, bench)  # bench quality
    report_cli.add_commands(sub, bench)  # report
    speed_cli.add_commands(sub, bench)  # bench speed
    analysis_cli.add_commands(sub, bench)  # analyze
    eval_cli.add_commands(sub, bench)  # eval
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
