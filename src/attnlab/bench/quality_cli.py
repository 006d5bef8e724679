"""Command ``attnlab bench quality``.

Only the parsers are built at import time; each command imports the benchmark (torch, the models,
the tasks) when it runs, so that ``attnlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlab.cli_errors import UsageError
from attnlab.console import make_console

if TYPE_CHECKING:
    from attnlab.bench.presets import QualityPreset

__all__ = ["add_commands", "cmd_quality"]


def _mechanism_list(text: str, tasks: Sequence[str], preset: QualityPreset, console: Any) -> dict[str, list[str]]:
    """``--mechanisms``: a comma list of mechanism specs (``NAME`` or ``NAME:key=value:...``, written in
    their canonical form), or "all" (every registered mechanism that fits each task; those left out
    are printed per task with the reason, one line each)."""
    import attnlab
    from attnlab.bench.quality import validate
    from attnlab.mechanism_spec import canonical

    if text.strip() == "all":
        names = [m.name for m in attnlab.mechanisms()]
        refused: dict[str, list[str]] = {t: [] for t in tasks}
        for refusal in validate(tasks, names, preset):
            refused[refusal.task].append(refusal.mechanism)
            console.print(f"--mechanisms all: left out {refusal}")
        for task in tasks:
            console.print(f"--mechanisms all: {task}: {len(names) - len(refused[task])} of {len(names)} "
                          f"registered mechanisms fit ({len(refused[task])} left out)")
        return {t: [n for n in names if n not in refused[t]] for t in tasks}
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--mechanisms {text!r} names no mechanism, so nothing would run: give a comma list "
                         f"(e.g. --mechanisms softmax,lightning) or 'all'")
    specs = []
    for name in names:
        try:
            specs.append(canonical(name))
        except (KeyError, ValueError) as error:  # attnlab.get's message names the closest registered names
            raise UsageError(f"--mechanisms: {error.args[0]}") from None
    repeated = sorted({s for s in specs if specs.count(s) > 1})
    if repeated:
        raise UsageError(f"--mechanisms {text!r} lists {', '.join(repeated)} more than once; list each once")
    return {t: specs for t in tasks}


def _positive(value: int | None, option: str, what: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{option} {value}: {what} must be at least 1")


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad options before anything is imported or trained (one line each)."""
    _positive(args.seeds, "--seeds", "the number of seeds")
    _positive(args.steps, "--steps", "the number of training steps")
    _positive(args.threads, "--threads", "the intra-op threads per run")
    _positive(args.workers, "--workers", "the number of worker processes")
    _positive(args.nproc, "--nproc", "the number of torchrun processes")
    _positive(args.context_parallel, "--context-parallel", "the number of ranks per sequence")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: give a folder for the run (results.jsonl goes in it)")
    if args.ray is not None and (args.nproc > 1 or args.context_parallel > 1):
        raise UsageError("--ray with --nproc/--context-parallel: a Ray task trains one run in one process; "
                         "choose one of the two")
    if args.workers is not None and args.workers > 1 and (args.nproc > 1 or args.context_parallel > 1):
        raise UsageError(f"--workers {args.workers} with --nproc/--context-parallel: torchrun already uses the "
                         f"processes for one run at a time; choose one of the two")


def _failed_line(failed: Sequence[dict[str, Any]]) -> str:
    runs = "; ".join(f"{r['task']} {r.get('config_label', '')} {r['mechanism']} seed {r['seed']} ({r['error']})"
                     for r in failed)
    return f"{len(failed)} run(s) failed: {runs}; rerun the same command to retry them"


def cmd_quality(args: argparse.Namespace) -> int:
    """Train the preset's jobs (or list the presets) and print the leaderboard; exit 1 when a run failed."""
    from rich.table import Table

    from attnlab.bench.presets import PRESETS, parse_learning_rates
    from attnlab.bench.quality_tasks import TASKS

    console = make_console()
    if args.list_presets:
        table = Table(title="quality presets")
        for column in ("preset", "seeds", "description", "task: configs"):
            table.add_column(column, overflow="fold")
        for preset in PRESETS.values():
            configs = "\n".join(f"{t}: " + "; ".join(TASKS[t].label(c) + f" ({c.steps} steps)" for c in cs)
                                for t, cs in preset.tasks.items())
            table.add_row(preset.name, str(preset.seeds), preset.description, configs)
        console.print(table)
        return 0
    if not args.out:
        raise UsageError("--out is required: the run folder that receives results.jsonl (e.g. --out runs/NAME)")
    _check_arguments(args)
    from attnlab.bench.quality import NothingToRun, check_device, run_quality
    from attnlab.bench.report import print_leaderboard
    from attnlab.bench.runner import default_workers

    try:
        check_device(args.device)
    except UsageError as error:
        raise UsageError(f"--device {args.device}: {error}") from None
    preset = _preset(args.preset)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"--tasks {args.tasks!r}: unknown task(s) {', '.join(map(repr, unknown)) or 'none given'} "
                         f"(tasks: {', '.join(TASKS)})")
    missing = [t for t in tasks if t not in preset.tasks]
    if missing:
        raise UsageError(f"--preset {preset.name}: no config for task(s) {', '.join(missing)}; choose another preset "
                         f"(--list-presets)")
    if args.variants:
        wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
        labels = {TASKS[t].label(c) for t in tasks for c in preset.tasks[t]}
        if not wanted or wanted - labels:
            raise UsageError(f"--variants {args.variants!r}: unknown label(s) {', '.join(sorted(wanted - labels))} "
                             f"(labels here: {', '.join(sorted(labels))})")
        kept = {t: [c for c in cs if TASKS[t].label(c) in wanted] for t, cs in preset.tasks.items()}
        preset = dataclasses.replace(preset, tasks={t: cs for t, cs in kept.items() if cs})
        missing = [t for t in tasks if t not in preset.tasks]
        if missing:
            raise UsageError(f"--variants {args.variants!r} leaves no config for task(s) {', '.join(missing)}")
    lrs = None if args.lrs is None else parse_learning_rates(args.lrs)
    mechanisms = _mechanism_list(args.mechanisms, tasks, preset, console)
    workers = default_workers() if args.workers is None else args.workers
    try:
        records = run_quality(tasks=tasks, mechanisms=mechanisms, preset=preset, seeds=args.seeds,
                              out_dir=args.out, nproc=args.nproc, device=args.device, threads=args.threads,
                              context_parallel=args.context_parallel, workers=workers, ray=args.ray,
                              strict=args.strict, progress=not args.no_progress, console=console, lrs=lrs,
                              steps=args.steps)
    except NothingToRun as error:
        raise UsageError(f"--mechanisms {args.mechanisms!r} --tasks {args.tasks!r}: {error}") from None
    print_leaderboard(records, console)
    console.print(f"results: {Path(args.out) / 'results.jsonl'}; report: attnlab report {args.out}")
    if records.failed:
        console.print(f"[red]{_failed_line(records.failed)}[/red]")
        return 1
    return 0


def _preset(name: str) -> QualityPreset:
    from attnlab.bench.presets import PRESETS, get_preset

    try:
        return get_preset(name)
    except KeyError:
        raise UsageError(f"--preset {name!r} is not a preset (presets: {', '.join(PRESETS)})") from None


def add_commands(sub: Any, bench: Any) -> None:
    """Register ``attnlab bench quality`` (under ``bench``); every help line shows its default."""
    p = bench.add_parser("quality", help="train every (task, mechanism, seed) of a preset and record the metrics")
    p.add_argument("--tasks", default="mqar,incontext_regression",
                   help="comma list of tasks (--list-presets shows them with their configs)")
    p.add_argument("--mechanisms", default="softmax",
                   help="comma list of registered mechanisms, each optionally with model options as "
                        "NAME:key=value[:key=value] (e.g. linear:feature_map=taylor:feature_dim=16), or 'all' "
                        "(those that fit each task; the others are listed with the reason)")
    p.add_argument("--strict", action="store_true",
                   help="refuse the whole run when one (task, mechanism) pair cannot run (otherwise the pairs "
                        "that fit run and each refusal is printed)")
    p.add_argument("--preset", default="quick", help="smoke | quick | standard | full")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (None: the preset's)")
    p.add_argument("--lrs", default=None, metavar="LR[,LR...]",
                   help="learning rates to train every task at, e.g. 1e-3,3e-3 (one rate: no sweep); default: "
                        "the preset's sweep (standard, full) or each config's rate (smoke, quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps for every config instead of its own; the rows of changed configs are "
                        "labelled with them, e.g. V8192-L64-P8-d64-625steps (None: each config's)")
    p.add_argument("--variants", default=None,
                   help="comma list of config labels to keep, as --list-presets shows them (None: all)")
    p.add_argument("--out", default=None, help="run folder, required (results.jsonl is appended; reruns resume)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes that train runs side by side while this process writes the results; "
                        "1 trains in this process (None: the cores this process may use)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="train each run as a Ray task on the cluster at ADDRESS (auto, head:6379, "
                        "ray://head:10001), or, with no ADDRESS, on a local Ray instance with --workers CPUs; "
                        "needs attnlab[ray] (None: no Ray)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes for DistributedDataParallel via torchrun, one run at a time")
    p.add_argument("--context-parallel", type=int, default=1, metavar="C",
                   help="ranks that split each sequence (decoder tasks; attnlab.distributed); torchrun starts "
                        "nproc * C processes")
    p.add_argument("--device", default=None, help="cpu or cuda (None: cpu)")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads per run")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.set_defaults(func=cmd_quality)
