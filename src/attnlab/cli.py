"""The ``attnlab`` command: list | check | demo | bench quality | bench speed | report | analyze | eval.

``list`` and ``check`` live here; every other command's module adds its parsers through
``add_commands(sub, bench)`` and imports what its command needs only when that command runs, so
that ``attnlab --help`` loads neither torch nor the registry.

:func:`main` is the one place where a command's failure becomes a message and an exit code:
:class:`attnlab.cli_errors.UsageError` is one line on stderr and exit 2 (as argparse's own errors),
:class:`attnlab.cli_errors.Interrupted` its message and exit 130, Ctrl-C elsewhere "interrupted"
and exit 130, any other exception one line naming it and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from attnlab.cli_errors import INTERRUPT_EXIT, USAGE_EXIT, Interrupted, UsageError

if TYPE_CHECKING:
    import attnlab

__all__ = ["main", "build_parser"]

# the modules that add commands; each imports torch-heavy code only inside its command
COMMAND_MODULES = ("attnlab.bench.quality_cli", "attnlab.bench.report_cli", "attnlab.bench.speed_cli",
                   "attnlab.analysis.cli", "attnlab.hf.eval_cli")
HEAVY_PACKAGES = ("attnlab.hf", "attnlab.analysis")  # packages whose __init__ imports torch


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default."""


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows every default (whatever formatter a command module asks
    for, the defaults are added to it) and whose errors are one line naming the fix."""

    def __init__(self, *args: Any, formatter_class: type[argparse.HelpFormatter] = _DefaultsFormatter,
                 **kwargs: Any) -> None:
        if not issubclass(formatter_class, argparse.ArgumentDefaultsHelpFormatter):
            formatter_class = type(f"{formatter_class.__name__}WithDefaults",
                                   (formatter_class, argparse.ArgumentDefaultsHelpFormatter), {})
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str) -> NoReturn:
        """argparse's error as one line (the usage is one ``--help`` away), exit 2."""
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _command_module(name: str) -> ModuleType:
    """Import a command module; one under a package of :data:`HEAVY_PACKAGES` is loaded from its file alone.

    The ``__init__`` of ``attnlab.hf`` and ``attnlab.analysis`` import torch (and the registry) to
    export their functions; their command modules need neither to build a parser. While such a
    package is not imported, the module is executed from its file and registered under its full
    name (later imports find it there); the package itself is imported as usual when the command runs.
    """
    package, _, leaf = name.rpartition(".")
    if name in sys.modules or package in sys.modules or package not in HEAVY_PACKAGES:
        return importlib.import_module(name)
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / f"{leaf}.py"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if path.exists() and module_spec is not None and module_spec.loader is not None:
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            return module
    return importlib.import_module(name)


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
    from rich.table import Table

    import attnlab
    from attnlab.console import make_console

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
    """Run each op (or layer with a reference) once on random input against its reference; exit 1 if any
    disagrees, 2 if nothing named can be checked."""
    from rich.table import Table

    import attnlab
    from attnlab.console import make_console
    from attnlab.testing import check_layer, check_mechanism, why_not_checkable

    console = make_console()
    records = []
    for name in args.names:
        try:
            records.append(attnlab.get(name))
        except KeyError as error:
            raise UsageError(f"NAME {error.args[0]}") from None
    records = records or attnlab.mechanisms()
    refused = {record.name: why_not_checkable(record) for record in records}
    if args.names and all(refused.values()):
        raise UsageError(f"NAME: nothing to check: {'; '.join(r for r in refused.values() if r)}")
    table = Table(title="fast path (float32) vs reference (float64), random inputs")
    for column in ("mechanism", "mode", "rel. error", "tolerance", "time (ms)", "result"):
        table.add_column(column)
    failed = 0
    for record in records:
        if refused[record.name]:
            table.add_row(record.name, "-", "-", "-", "-", "not checked: no reference (see tests)")
            continue
        check = check_mechanism if record.op is not None and record.reference is not None else check_layer
        modes = [c for c in (False, True) if (record.supports_causal if c else record.supports_bidirectional)]
        for causal in modes:
            result = check(record, causal=causal, seed=args.seed)
            failed += not result.ok
            table.add_row(record.name, "causal" if causal else "bidirectional", f"{result.relative_error:.2e}",
                          f"{result.tolerance:.0e}", f"{result.seconds * 1e3:.2f}",
                          "[green]ok[/green]" if result.ok else "[red]DISAGREES[/red]")
    console.print(table)
    if args.names:
        for reason in filter(None, refused.values()):
            console.print(f"[yellow]not checked: {reason}[/yellow]")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """What ``make demo`` runs: the quality benchmark's quick preset over the registered mechanisms on
    mqar, in-context regression and digits, a CPU speed sweep, then the report."""
    from attnlab.bench.demo import run_demo
    from attnlab.bench.presets import get_preset
    from attnlab.console import make_console

    console = make_console()
    try:
        get_preset(args.preset)
    except KeyError as error:  # an unknown preset, refused before anything runs
        raise UsageError(f"--preset: {error.args[0]}") from None
    cmd_list(args)
    return run_demo(preset=args.preset, out=args.out, workers=args.workers, console=console)


def build_parser() -> argparse.ArgumentParser:
    """The ``attnlab`` parser and its subcommands; builds without importing torch."""
    from attnlab import __version__

    parser = CommandParser(prog="attnlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message (accepted "
                             "anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    p = sub.add_parser("list", help="the registered mechanisms as a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check", help="each mechanism's fast path against its reference")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="mechanism names (none: all; a layer is checked when it has a reference impl)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and parameters")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="the main job on the built-in default (what `make demo` runs)")
    p.add_argument("--preset", default="quick", help="quality preset: smoke | quick | standard | full")
    p.add_argument("--out", default=None, help="run folder (None: runs/demo-<time>)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that train runs side by side (None: the cores this process may use)")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="quality and speed benchmarks").add_subparsers(dest="bench_command",
                                                                                       required=True)
    # one line per command module: ``sub`` takes top-level commands, ``bench`` those under ``attnlab bench``
    for name in COMMAND_MODULES:  # bench quality, report, bench speed, analyze, eval
        _command_module(name).add_commands(sub, bench)
    return parser


def _command_name(args: argparse.Namespace | None, argv: Sequence[str]) -> str:
    """``"bench speed"``, ``"analyze"``, ...: the command an error message names."""
    if args is not None and getattr(args, "command", None):
        bench = getattr(args, "bench_command", None)
        return f"{args.command} {bench}" if args.command == "bench" and bench else args.command
    words = [word for word in argv if not word.startswith("-")]
    return " ".join(words[:2] if words[:1] == ["bench"] else words[:1]) or "attnlab"


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (a multi-line message joined with '; ')."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``attnlab`` command line; return its exit code (0 ok, 1 failure, 2 usage, 130 interrupted).

    ``--debug`` anywhere on the line (before a lone ``--``) re-raises instead of printing one line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    if debug:
        argv = [word for i, word in enumerate(argv) if not (word == "--debug" and i < end)]
    args = None
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as error:
        if debug:
            raise
        line, code = _failure(error, f"attnlab {_command_name(args, argv)}")
        print(line, file=sys.stderr)
        return code


def _failure(error: BaseException, command: str) -> tuple[str, int]:
    """The one stderr line and the exit code of a command that raised ``error``."""
    if isinstance(error, UsageError):
        return f"{command}: error: {_one_line(error)}", USAGE_EXIT
    if isinstance(error, Interrupted):
        return _one_line(error), INTERRUPT_EXIT
    if isinstance(error, KeyboardInterrupt):
        return f"{command}: interrupted", INTERRUPT_EXIT
    return f"{command}: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)", 1

if __name__ == "__main__":
    sys.exit(main())
