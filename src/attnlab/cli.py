"""The ``attnlab`` command: list | check | demo (and, as they land, bench / analyze / report)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

import attnlab
from attnlab.testing import check_mechanism

__all__ = ["main", "build_parser"]

console = Console(width=None if sys.stdout.isatty() else 150)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registry as a table."""
    table = Table(title=f"attnlab {attnlab.__version__}: {len(attnlab.mechanisms())} mechanisms")
    for column in ("name", "family", "causal", "bidir.", "kind", "complexity", "paper", "arXiv"):
        table.add_column(column, overflow="fold")
    for m in attnlab.mechanisms():
        kind = "op" if m.layer is None else ("op+layer" if m.op is not None else "layer")
        table.add_row(m.name, m.family, "yes" if m.supports_causal else "-",
                      "yes" if m.supports_bidirectional else "-", kind, m.complexity, m.paper, m.arxiv or "-")
    console.print(table)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Run each op once on random input against its reference; non-zero exit if any disagrees."""
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
    mqar, in-context regression and digits (plus a CPU speed sweep when installed), then the report."""
    from attnlab.bench.quality_cli import run_demo

    cmd_list(args)
    return run_demo(preset=getattr(args, "preset", "quick"), out=getattr(args, "out", None), console=console)


Command = Callable[[argparse.Namespace], int]

# Modules that add their own subcommands: each defines ``add_commands(sub, bench)`` where ``sub`` is
# the top-level subparsers and ``bench`` the subparsers of ``attnlab bench``.
COMMAND_MODULES: tuple[str, ...] = (
    "attnlab.bench.quality_cli",
    "attnlab.bench.speed_cli",
    "attnlab.analysis.cli",
)


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
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="quality and speed benchmarks").add_subparsers(dest="bench_command",
                                                                                       required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub, bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
