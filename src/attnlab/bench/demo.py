"""``attnlab demo`` (what ``make demo`` runs): the quality benchmark's quick preset on three tasks over
at least 8 registered mechanisms, a short CPU speed sweep, the report and the leaderboard.

The mechanisms are chosen per task in :data:`PREFERRED_MECHANISMS` order (then registry order) among
those that fit the task and train at most 3x slower per step than softmax, measured on the spot. The
runs train side by side in worker processes (one per core, :func:`attnlab.bench.runner.run_in_workers`),
:data:`DEMO_SEEDS` seeds each, so the leaderboard shows a spread over seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import attnlab
from attnlab.bench.presets import QualityPreset, get_preset
from attnlab.bench.quality import run_quality, validate
from attnlab.bench.quality_tasks import TASKS
from attnlab.bench.report import print_leaderboard, write_report
from attnlab.bench.runner import default_workers
from attnlab.bench.speed import run_speed_benchmark
from attnlab.cli_errors import UsageError
from attnlab.console import make_console

__all__ = ["run_demo", "DEMO_TASKS", "DEMO_SEEDS", "DEMO_BUDGET_S", "PREFERRED_MECHANISMS", "choose_demo_mechanisms"]

DEMO_TASKS = ("mqar", "incontext_regression", "digits")
# Seeds per (task, mechanism): with the runs spread over the cores, two seeds fit the time budget on
# a 2-core machine and give the leaderboard a mean and a spread instead of one value.
DEMO_SEEDS = 2
DEMO_BUDGET_S = 6 * 60  # what `make demo` may take on an idle 2-core machine

# The demo's order of preference; whatever else is registered follows in registry order.
PREFERRED_MECHANISMS = (
    "softmax", "lightning", "sliding_window", "moh", "agent", "tnl", "lightnet", "deconstructed", "flashbias",
    "neighborhood", "linear", "tensor",
)


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


def run_demo(*, preset: str = "quick", out: str | Path | None = None, seeds: int = DEMO_SEEDS,
             workers: int | None = None, console: Console | None = None) -> int:
    """The main job: the quality preset over the registered mechanisms on mqar, in-context regression and
    digits, a CPU speed sweep, the report and the leaderboard. ``workers``: processes that train runs
    side by side (default: the cores this process may use; 1 trains in this process).

    An unknown ``preset`` raises ``KeyError`` naming the presets."""
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers {workers}: the number of worker processes must be at least 1")
    console = console or make_console()
    started, cpu_started = time.perf_counter(), time.process_time()
    quality = get_preset(preset)
    out = Path(out) if out is not None else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "results.jsonl").exists():
        raise UsageError(f"--out {out} already holds results: the demo trains afresh, so give a new folder (or no "
                         f"--out for runs/demo-<time>); `attnlab report {out}` shows what is there")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is faster than two spinning on a shared CPU
    try:
        return _demo(quality, preset, out, seeds, workers, console, started, cpu_started)
    finally:
        torch.set_num_threads(previous_threads)


def _demo(quality: QualityPreset, preset: str, out: Path, seeds: int, workers: int, console: Console,
          started: float, cpu_started: float) -> int:
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
    console.print(f"training {seeds} seed(s) per (task, mechanism) in {workers} worker process(es)")
    quality_started = time.perf_counter()
    # the demo picks its mechanisms by timing them, so a rerun plans afresh in a new folder
    records = run_quality(tasks=list(chosen), mechanisms=chosen, preset=quality, seeds=seeds, out_dir=out,
                          workers=workers, progress=console.is_terminal, console=console,
                          resume_hint=f"`attnlab report {out}` shows them; `attnlab demo` starts afresh in a "
                                      f"new folder")
    console.print(f"quality runs: {time.perf_counter() - quality_started:.0f} s wall with {workers} worker(s)")
    # The budget is for an otherwise idle 2-core machine; the runs use every core, so the wall clock
    # (not this process's CPU time, which leaves out the workers') is what is left of it.
    speed_note = _speed_sweep(out, console, time_left=DEMO_BUDGET_S - (time.perf_counter() - started),
                              preset=preset)
    report, leaderboard = write_report(out, title=f"attnlab demo ({preset} preset)")
    print_leaderboard(records, console)
    console.print(f"mechanisms run ({len(ran)}): {', '.join(ran)}")
    console.print(speed_note)
    console.print(f"report: {report}\nleaderboard: {leaderboard}\n"
                  f"total time {time.perf_counter() - started:.0f} s wall ({workers} worker(s), {seeds} seed(s); "
                  f"{time.process_time() - cpu_started:.0f} s CPU in the main process)")
    if records.failed:
        console.print(f"[red]{len(records.failed)} run(s) failed: "
                      + "; ".join(f"{r['task']} {r['mechanism']} seed {r['seed']} ({r['error']})"
                                  for r in records.failed) + "[/red]")
        return 1
    return 0


def _speed_sweep(out: Path, console: Console, *, time_left: float, preset: str) -> str:
    if preset == "smoke":
        return "speed sweep: skipped for the smoke preset"
    if time_left < 30:
        return f"speed sweep: skipped ({max(time_left, 0):.0f} s left of the {DEMO_BUDGET_S // 60}-minute budget)"
    console.rule("CPU speed-scaling sweep")
    try:
        # the sweep stops at what is left of the budget; the cells it leaves are marked "not run (time budget)"
        run_speed_benchmark(preset="demo", out_dir=out, max_total_seconds=min(time_left, 150.0))
    except Exception as error:  # noqa: BLE001 - the quality results stand on their own
        return f"speed sweep: failed ({type(error).__name__}: {error})"
    return f"speed sweep: {out / 'speed.jsonl'} (in the report)"
