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

from attnlab.console import make_console

if TYPE_CHECKING:
    from attnlab.bench.presets import QualityPreset

__all__ = ["add_commands", "cmd_quality"]


def _mechanism_list(text: str, tasks: Sequence[str], preset: QualityPreset) -> dict[str, list[str]]:
    """``--mechanisms``: a comma list, or "all" (every registered mechanism that fits each task)."""
    import attnlab
    from attnlab.bench.quality import validate

    if text.strip() == "all":
        names = [m.name for m in attnlab.mechanisms()]
        refused: dict[str, set[str]] = {t: set() for t in tasks}
        for refusal in validate(tasks, names, preset):
            refused[refusal.task].add(refusal.mechanism)
        return {t: [n for n in names if n not in refused[t]] for t in tasks}
    names = [n.strip() for n in text.split(",") if n.strip()]
    return {t: names for t in tasks}


def cmd_quality(args: argparse.Namespace) -> int:
    """Train the preset's jobs (or list the presets) and print the leaderboard."""
    from rich.table import Table

    from attnlab.bench.presets import PRESETS, get_preset
    from attnlab.bench.quality import QualityError, run_quality
    from attnlab.bench.quality_tasks import TASKS
    from attnlab.bench.report import print_leaderboard

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
        console.print("[red]--out is required (e.g. --out runs/NAME)[/red]")
        return 2
    try:
        preset = get_preset(args.preset)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise QualityError(f"unknown task(s) {', '.join(map(repr, unknown))} (tasks: {', '.join(TASKS)})")
        if args.variants:
            wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
            kept = {t: [c for c in cs if TASKS[t].label(c) in wanted] for t, cs in preset.tasks.items()}
            preset = dataclasses.replace(preset, tasks={t: cs for t, cs in kept.items() if cs})
            missing = [t for t in tasks if t not in preset.tasks]
            if missing:
                raise QualityError(f"--variants {args.variants!r} leaves no config for task(s) {', '.join(missing)}")
        mechanisms = _mechanism_list(args.mechanisms, tasks, preset)
        records = run_quality(tasks=tasks, mechanisms=mechanisms, preset=preset, seeds=args.seeds, out_dir=args.out,
                              nproc=args.nproc, device=args.device, threads=args.threads,
                              context_parallel=args.context_parallel,
                              progress=not args.no_progress, console=console)
    except (QualityError, KeyError) as error:
        console.print(f"[red]{error.args[0]}[/red]")
        return 2
    print_leaderboard(records, console)
    console.print(f"results: {Path(args.out) / 'results.jsonl'}; report: attnlab report {args.out}")
    return 0


def add_commands(sub: Any, bench: Any) -> None:
    """Register ``attnlab bench quality`` (under ``bench``)."""
    p = bench.add_parser("quality", help="train every (task, mechanism, seed) of a preset and record the metrics")
    p.add_argument("--tasks", default="mqar,incontext_regression",
                   help="comma list of tasks (--list-presets shows them with their configs)")
    p.add_argument("--mechanisms", default="softmax", help="comma list of registered mechanisms, or 'all'")
    p.add_argument("--preset", default="quick", help="smoke | quick | standard | full (default quick)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the preset's)")
    p.add_argument("--variants", default=None,
                   help="comma list of config labels to keep (as --list-presets shows them; default: all)")
    p.add_argument("--out", default=None, help="run folder (results.jsonl is appended; reruns resume)")
    p.add_argument("--nproc", type=int, default=1, help="processes for DistributedDataParallel via torchrun")
    p.add_argument("--context-parallel", type=int, default=1, metavar="C",
                   help="ranks that split each sequence (decoder tasks; attnlab.distributed); torchrun starts "
                        "nproc * C processes")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads per process (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.set_defaults(func=cmd_quality)
