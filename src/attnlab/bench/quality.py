"""The quality benchmark: train every (task, mechanism, seed, config) and append one JSON line each.

Everything the runner does with a mechanism goes through the registry (``attnlab.mechanisms()`` /
``attnlab.get()``), so mechanisms registered later are picked up without changes here. Before any
training starts, every requested (task, mechanism) pair is checked: unknown names, mechanisms whose
role is not "mixer", non-causal mechanisms for a language model, causal-only ones for an encoder, and
mechanisms whose model cannot be built or run at the task's sizes are refused with the reason.

The tasks are in :mod:`attnlab.bench.quality_tasks`, one job in :mod:`attnlab.bench.quality_jobs`,
the loops over jobs (in this process, in worker processes, on Ray) in :mod:`attnlab.bench.runner`,
the training loop in :mod:`attnlab.bench.training`; this module validates, plans, resumes and runs
(or hands the jobs to torchrun with :mod:`attnlab.bench.ddp`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.bench.ddp import launch
from attnlab.bench.presets import QualityPreset, get_preset
from attnlab.bench.quality_jobs import RESULT_KEY, Job
from attnlab.bench.quality_tasks import TASKS, QualityTask
from attnlab.bench.results import completed_keys, load_results, result_key
from attnlab.bench.runner import execute
from attnlab.registry import Mechanism

__all__ = ["Refusal", "plan_jobs", "validate", "run_quality", "QualityError", "fitting_mechanisms", "pending_jobs"]


class QualityError(ValueError):
    """A request the benchmark refuses before training (unknown names, mechanisms that do not fit)."""


@dataclass(frozen=True)
class Refusal:
    task: str
    mechanism: str
    reason: str

    def __str__(self) -> str:
        return f"{self.mechanism} on {self.task}: {self.reason}"


def _probe(task: QualityTask, config: Any, record: Mechanism) -> str | None:
    """Build the task's model with this mechanism and run one tiny forward/backward; the error, or None."""
    try:
        torch.manual_seed(0)
        model = task.build(config, record.name, task.causal_for(record))
        out = model(task.probe(config))
        out.float().square().mean().backward()
        if not torch.isfinite(out).all():
            return "the model's output is not finite on random inputs"
    except Exception as error:  # noqa: BLE001 - any failure means the mechanism cannot run this task
        return f"the model cannot be built or run at the task's sizes: {type(error).__name__}: {error}"
    return None


def validate(tasks: Sequence[str], mechanisms: Sequence[str], preset: QualityPreset, *,
             probe: bool = True) -> list[Refusal]:
    """Every reason to refuse a (task, mechanism) pair before training; ``[]`` when all fit.

    Unknown task or mechanism names raise :class:`QualityError` right away.
    """
    unknown_tasks = [t for t in tasks if t not in TASKS]
    if unknown_tasks:
        raise QualityError(f"unknown task(s) {', '.join(map(repr, unknown_tasks))} (tasks: {', '.join(TASKS)})")
    missing = [t for t in tasks if t not in preset.tasks]
    if missing:
        raise QualityError(f"preset {preset.name!r} has no config for task(s) {', '.join(missing)}")
    records = []
    for name in mechanisms:
        try:
            records.append(attnlab.get(name))
        except (KeyError, TypeError) as error:
            raise QualityError(error.args[0]) from None
    refusals = []
    for task_name in tasks:
        task = TASKS[task_name]
        for record in records:
            reason = task.refusal(record)
            if reason is None and probe:
                for config in preset.tasks[task_name]:
                    reason = _probe(task, config, record)
                    if reason is not None:
                        break
            if reason is not None:
                refusals.append(Refusal(task_name, record.name, reason))
    return refusals


def fitting_mechanisms(task: str, preset: QualityPreset, candidates: Sequence[str] | None = None) -> list[str]:
    """The registered mechanisms (or ``candidates``) that can run ``task`` under ``preset``."""
    names = [m.name for m in attnlab.mechanisms()] if candidates is None else list(candidates)
    refused = {r.mechanism for r in validate([task], names, preset)}
    return [n for n in names if n not in refused]


def _context_parallel_refusals(tasks: Sequence[str], per_task: Mapping[str, Sequence[str]], preset: QualityPreset,
                               context_parallel: int) -> list[str]:
    """Why ``--context-parallel`` cannot run these jobs: decoder tasks, functional ops, no short convolution."""
    if context_parallel < 1:
        return [f"context_parallel={context_parallel} must be at least 1"]
    if context_parallel == 1:
        return []
    refusals = []
    for task in tasks:
        if TASKS[task].masking != "causal":
            refusals.append(f"--context-parallel splits the sequences of decoder tasks; {task!r} is not one")
            continue
        for config in preset.tasks.get(task, []):
            if getattr(config, "short_conv", 0):
                refusals.append(f"--context-parallel: {task} {TASKS[task].label(config)} has a short convolution, "
                                f"which reads tokens across shards")
        for mechanism in per_task.get(task, []):
            if attnlab.get(mechanism).layer is not None:
                refusals.append(f"--context-parallel: mechanism {mechanism!r} has its own layer (not a functional op)")
    return refusals


def plan_jobs(tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]], preset: QualityPreset,
              seeds: int) -> list[Job]:
    """Every (task, config, mechanism, seed); ``mechanisms`` may be one list or a list per task."""
    per_task = mechanisms if isinstance(mechanisms, Mapping) else {t: mechanisms for t in tasks}
    return [Job(task, mechanism, seed, config, preset.name)
            for task in tasks for config in preset.tasks[task] for mechanism in per_task[task]
            for seed in range(seeds)]


def pending_jobs(jobs: Sequence[Job], results_path: Path) -> list[Job]:
    done = completed_keys(load_results(results_path), RESULT_KEY)
    return [j for j in jobs if result_key(j.key_record(), RESULT_KEY) not in done]


def run_quality(*, tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]],
                preset: str | QualityPreset = "quick",
                seeds: int | None = None, out_dir: str | Path, nproc: int = 1, device: str | None = None,
                threads: int | None = 1, progress: bool = True, console: Any = None,
                context_parallel: int = 1) -> list[dict[str, Any]]:
    """Validate, then train every pending job and append its record to ``out_dir/results.jsonl``.

    ``mechanisms`` is one list for all tasks or a mapping task -> list. Returns the records of this
    run's jobs (already finished ones included, read from the file). Raises :class:`QualityError`
    listing every refusal before anything trains. ``threads``: intra-op CPU threads (default 1: these
    models are small, and on a shared CPU more threads spin-wait against each other; ``None`` keeps
    PyTorch's setting). ``context_parallel=C``: each sequence split over ``C`` ranks
    (:mod:`attnlab.distributed`), ``nproc`` data-parallel replicas of them, ``nproc * C`` processes.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_quality(tasks, mechanisms, preset, seeds, out_dir, nproc, device, progress, console,
                            context_parallel)
    finally:
        torch.set_num_threads(previous_threads)


def _run_quality(tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]],
                 preset: str | QualityPreset, seeds: int | None, out_dir: str | Path, nproc: int,
                 device: str | None, progress: bool, console: Any, context_parallel: int = 1,
                 ) -> list[dict[str, Any]]:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    seeds = preset.seeds if seeds is None else seeds
    if seeds < 1:
        raise QualityError(f"seeds={seeds} must be at least 1")
    if nproc < 1:
        raise QualityError(f"nproc={nproc} must be at least 1")
    per_task = mechanisms if isinstance(mechanisms, Mapping) else {t: list(mechanisms) for t in tasks}
    refusals = [r for t in tasks for r in validate([t], per_task.get(t, []), preset)]
    refusals += _context_parallel_refusals(tasks, per_task, preset, context_parallel)
    if refusals:
        raise QualityError("refused before training:\n" + "\n".join(f"  - {r}" for r in refusals))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    jobs = plan_jobs(tasks, per_task, preset, seeds)
    todo = pending_jobs(jobs, results_path)
    if console is not None:
        console.print(f"{len(jobs)} runs in plan, {len(jobs) - len(todo)} already in {results_path}, "
                      f"{len(todo)} to train")
    if todo:
        if nproc > 1 or context_parallel > 1:
            launch(todo, out_dir=out, nproc=nproc * context_parallel, device=device, context_parallel=context_parallel)
        else:
            execute(todo, results_path=results_path, device=torch.device(device or "cpu"), progress=progress,
                    console=console)
    wanted = {result_key(j.key_record(), RESULT_KEY) for j in jobs}
    return [r for r in load_results(results_path) if result_key(r, RESULT_KEY) in wanted]
