"""Commands ``attnlab bench quality``, ``attnlab report`` and the body of ``attnlab demo``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import attnlab
from attnlab.bench.presets import PRESETS, QualityPreset, get_preset
from attnlab.bench.quality import TASKS, QualityError, run_quality, validate
from attnlab.bench.report import aggregate, write_report

__all__ = ["add_commands", "run_demo", "DEMO_TASKS", "PREFERRED_MECHANISMS", "choose_demo_mechanisms"]

DEMO_TASKS = ("mqar", "incontext_regression", "digits")

# The demo's order of preference; whatever else is registered follows in registry order. A name
# that is not registered is simply passed over.
PREFERRED_MECHANISMS = (
    "softmax", "lightning", "sliding_window", "moh", "agent", "tnl", "lightnet", "deconstructed", "flashbias",
    "neighborhood", "linear", "retnet", "gla", "mamba2", "cosformer", "hebbian", "tensor",
)

def _console() -> Console:
    from attnlab.cli import console

    return console


def _mechanism_list(text: str, tasks: Sequence[str], preset: QualityPreset) -> dict[str, list[str]]:
    """``--mechanisms``: a comma list, or "all" (every registered mechanism that fits each task)."""
    if text.strip() == "all":
        names = [m.name for m in attnlab.mechanisms()]
        refused: dict[str, set[str]] = {t: set() for t in tasks}
        for refusal in validate(tasks, names, preset):
            refused[refusal.task].add(refusal.mechanism)
        return {t: [n for n in names if n not in refused[t]] for t in tasks}
    names = [n.strip() for n in text.split(",") if n.strip()]
    return {t: names for t in tasks}


def cmd_quality(args: argparse.Namespace) -> int:
    console = _console()
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
                              progress=not args.no_progress, console=console)
    except (QualityError, KeyError) as error:
        console.print(f"[red]{error.args[0]}[/red]")
        return 2
    print_leaderboard(records, console)
    console.print(f"results: {Path(args.out) / 'results.jsonl'}; report: attnlab report {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    console = _console()
    try:
        report, leaderboard = write_report(args.run_dir)
    except FileNotFoundError as error:
        console.print(f"[red]{error}[/red]")
        return 2
    console.print(f"wrote {report} and {leaderboard}")
    return 0


def print_leaderboard(records: Sequence[dict[str, Any]], console: Console) -> None:
    rows = aggregate(records)
    tables: dict[tuple[str, str], list[Any]] = {}
    for row in rows:
        tables.setdefault((row.task, row.config_label), []).append(row)
    for (task, label), group in tables.items():
        direction = "higher is better" if group[0].higher_is_better else "lower is better"
        table = Table(title=f"{task} ({label}): {group[0].metric}, {direction}")
        for column in ("rank", "mechanism", "family", group[0].metric, "seeds", "params", "time (s)"):
            table.add_column(column)
        for rank, row in enumerate(group, 1):
            table.add_row(str(rank), row.mechanism, row.family, f"{row.mean:.4f} ± {row.std:.4f}",
                          str(len(row.values)), f"{row.parameters:,}", f"{row.wall_time_s:.1f}")
        console.print(table)
        if "baseline_ridge" in group[0].extras:
            console.print(f"  baselines: ridge {group[0].extras['baseline_ridge']:.4f}, one-step debiased GD "
                          f"{group[0].extras['baseline_debiased_gd_one_step']:.4f}")


def _step_seconds(task: str, mechanism: str, config: Any, *, give_up_after: float = math.inf) -> float:
    """Seconds of one training step (forward + backward + AdamW) of ``mechanism`` on ``task`` at the
    config's batch size, timed after one warm-up step on the task's probe inputs. A warm-up slower than
    ``give_up_after`` seconds is returned as is (no second step)."""
    spec = TASKS[task]
    torch.manual_seed(0)
    model = spec.build(config, mechanism, spec.causal_for(attnlab.get(mechanism)))
    probe = spec.probe(config)
    inputs = probe.repeat(config.batch_size // probe.shape[0], *([1] * (probe.ndim - 1)))
    optimizer = torch.optim.AdamW(model.parameters())
    seconds = math.inf
    for _ in range(2):
        start = time.perf_counter()
        model(inputs).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - start
        if seconds > give_up_after:
            break
    return seconds


def choose_demo_mechanisms(preset: QualityPreset, *, tasks: Sequence[str] = DEMO_TASKS, max_per_task: int = 8,
                           max_slowdown: float | None = 3.0,
                           console: Console | None = None) -> dict[str, list[str]]:
    """Per task, up to ``max_per_task`` registered mechanisms, in :data:`PREFERRED_MECHANISMS` order
    (then registry order), that fit the task and train at most ``max_slowdown`` times slower per step
    than the first one picked (softmax), both measured here and now: a ratio, so the choice does not
    depend on how busy the machine is. ``max_slowdown=None`` skips the timing (the smoke preset)."""
    registered = [m.name for m in attnlab.mechanisms()]
    order = [n for n in PREFERRED_MECHANISMS if n in registered] + [n for n in registered
                                                                    if n not in PREFERRED_MECHANISMS]
    chosen: dict[str, list[str]] = {}
    for task in tasks:
        config = preset.tasks[task][0]
        baseline: float | None = None
        picked: list[str] = []
        for name in order:
            if len(picked) >= max_per_task:
                break
            refusals = validate([task], [name], preset)
            if refusals:
                if console is not None:
                    console.print(f"  [dim]{task}: skip {name}: {refusals[0].reason}[/dim]")
                continue
            if max_slowdown is not None:
                limit = math.inf if baseline is None else 2 * max_slowdown * baseline
                seconds = _step_seconds(task, name, config, give_up_after=limit)
                if baseline is None:
                    baseline = seconds
                elif seconds > max_slowdown * baseline:
                    if console is not None:
                        console.print(f"  [dim]{task}: skip {name}: a training step takes {seconds / baseline:.1f}x "
                                      f"as long as {picked[0]}'s (limit {max_slowdown:g}x)[/dim]")
                    continue
            picked.append(name)
        chosen[task] = picked
    return chosen


def run_demo(*, preset: str = "quick", out: str | Path | None = None, seeds: int = 1,
             console: Console | None = None) -> int:
    """The main job: the quality preset over the registered mechanisms on mqar, in-context regression and
    digits, a CPU speed sweep when the speed benchmark is installed, the report and the leaderboard."""
    console = console or _console()
    started, cpu_started = time.perf_counter(), time.process_time()
    quality = get_preset(preset)
    out = Path(out) if out is not None else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "results.jsonl").exists():
        console.print(f"[red]{out} already holds results; the demo trains afresh into a new folder[/red]")
        return 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is faster than two spinning on a shared CPU
    try:
        return _demo(quality, preset, out, seeds, console, started, cpu_started)
    finally:
        torch.set_num_threads(previous_threads)


def _demo(quality: QualityPreset, preset: str, out: Path, seeds: int, console: Console, started: float,
          cpu_started: float) -> int:
    registered = [m.name for m in attnlab.mechanisms()]
    console.rule(f"attnlab demo: preset {preset!r}, {len(registered)} registered mechanisms")
    console.print("choosing mechanisms (fit to each task; step time at most 3x the first one's) ...")
    chosen = choose_demo_mechanisms(quality, max_slowdown=None if preset == "smoke" else 3.0, console=console)
    ran = sorted({n for names in chosen.values() for n in names}, key=registered.index)
    for task, names in chosen.items():
        console.print(f"  {task} runs: {', '.join(names)}")
    if len(ran) < 8:
        console.print(f"[yellow]only {len(ran)} mechanisms fit the demo ({len(registered)} registered); "
                      f"the demo asks for at least 8[/yellow]")
    records = run_quality(tasks=list(chosen), mechanisms=chosen, preset=quality, seeds=seeds, out_dir=out,
                          progress=console.is_terminal, console=console)
    # The 6-minute budget is for an otherwise idle 2-core machine, where this single-threaded process's
    # CPU time is its wall time; on a shared machine the wall clock runs slower than the work done.
    speed_note = _speed_sweep(out, console, time_left=6 * 60 - (time.process_time() - cpu_started), preset=preset)
    report, leaderboard = write_report(out, title=f"attnlab demo ({preset} preset)")
    print_leaderboard(records, console)
    console.print(f"mechanisms run ({len(ran)}): {', '.join(ran)}")
    console.print(speed_note)
    console.print(f"report: {report}\nleaderboard: {leaderboard}\n"
                  f"total time {time.perf_counter() - started:.0f} s wall, "
                  f"{time.process_time() - cpu_started:.0f} s CPU (the two differ when the machine is shared)")
    return 0


def _speed_sweep(out: Path, console: Console, *, time_left: float, preset: str) -> str:
    try:
        from attnlab.bench.speed import run_speed_benchmark
    except ImportError:
        return "speed sweep: skipped (attnlab.bench.speed is not installed)"
    if preset == "smoke":
        return "speed sweep: skipped for the smoke preset"
    if time_left < 30:
        return f"speed sweep: skipped ({max(time_left, 0):.0f} s left of the 6-minute budget)"
    console.rule("CPU speed-scaling sweep")
    try:
        run_speed_benchmark(preset="demo", out_dir=out)
    except Exception as error:  # noqa: BLE001 - the quality results stand on their own
        return f"speed sweep: failed ({type(error).__name__}: {error})"
    return f"speed sweep: {out / 'speed.jsonl'} (in the report)"


def add_commands(sub: Any, bench: Any) -> None:
    """Register ``attnlab bench quality`` and ``attnlab report``; add ``--preset``/``--out`` to ``demo``."""
    p = bench.add_parser("quality", help="train every (task, mechanism, seed) of a preset and record the metrics")
    p.add_argument("--tasks", default="mqar,incontext_regression",
                   help=f"comma list of tasks ({', '.join(TASKS)})")
    p.add_argument("--mechanisms", default="softmax", help="comma list of registered mechanisms, or 'all'")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the preset's)")
    p.add_argument("--variants", default=None,
                   help="comma list of config labels to keep (as --list-presets shows them; default: all)")
    p.add_argument("--out", default=None, help="run folder (results.jsonl is appended; reruns resume)")
    p.add_argument("--nproc", type=int, default=1, help="processes for DistributedDataParallel via torchrun")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads per process (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("report", help="report.html and leaderboard.md of a run folder")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_report)

    demo = sub.choices.get("demo")
    if demo is not None:
        demo.add_argument("--preset", default="quick", choices=sorted(PRESETS))
        demo.add_argument("--out", default=None, help="run folder (default runs/demo-<time>)")
