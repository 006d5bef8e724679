"""One training run of the quality benchmark (a :class:`Job`) and the loop that runs a list of them.

A job is (task, mechanism, seed, config, preset); :func:`run_job` trains and scores it and returns
its JSON record; :func:`execute` runs jobs one after the other and appends each record to the
results file. The single-process runner (:mod:`attnlab.bench.quality`) and every torchrun worker
(:mod:`attnlab.bench.ddp`) call :func:`execute`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import attnlab
from attnlab.bench.quality_tasks import TASKS, config_label
from attnlab.bench.results import append_result, versions
from attnlab.bench.training import distributed_rank_and_world

__all__ = ["Job", "RESULT_KEY", "run_job", "execute"]

RESULT_KEY = ("task", "mechanism", "seed", "config")


@dataclass(frozen=True)
class Job:
    """One training run: what is recorded and what resume compares."""

    task: str
    mechanism: str
    seed: int
    config: Any
    preset: str

    @property
    def label(self) -> str:
        return config_label(self.task, self.config)

    def key_record(self) -> dict[str, Any]:
        return {"task": self.task, "mechanism": self.mechanism, "seed": self.seed,
                "config": dataclasses.asdict(self.config)}

    def to_json(self) -> dict[str, Any]:
        return {**self.key_record(), "preset": self.preset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        task = TASKS[data["task"]]
        return cls(data["task"], data["mechanism"], int(data["seed"]), task.config_type(**data["config"]),
                   data["preset"])


def run_job(job: Job, *, device: torch.device | None = None, on_step: Callable[[int], None] | None = None,
            context_parallel: int = 1) -> tuple[dict[str, Any], nn.Module]:
    """Train and score one job; the JSON record (without writing it) and the trained model
    (``context_parallel``: ranks that split each sequence, see :func:`attnlab.bench.training.train_loop`)."""
    device = device or torch.device("cpu")
    task = TASKS[job.task]
    record = attnlab.get(job.mechanism)
    torch.manual_seed(job.seed)
    model = task.build(job.config, job.mechanism, task.causal_for(record))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trunk = getattr(model, "trunk", None)
    options = {k: v if isinstance(v, int | float | str | bool) or v is None else repr(v)
               for k, v in getattr(trunk, "mixer_options", {}).items()}
    state_size = getattr(model, "state_size", None)
    start = time.perf_counter()
    outcome = task.train(job.config, model, job.seed, device, on_step, context_parallel=context_parallel)
    wall = time.perf_counter() - start
    _, world = distributed_rank_and_world()
    result = {
        **job.to_json(),
        "config_label": job.label,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "value": outcome.metrics[task.metric],
        "metrics": outcome.metrics,
        "loss_curve": outcome.loss_curve,
        "parameters": parameters,
        "state_size": state_size,
        "family": record.family,
        "mixer_options": options,
        "causal": task.causal_for(record),
        "steps": job.config.steps,
        "wall_time_s": round(wall, 3),
        "world_size": world,
        "context_parallel": context_parallel,
        "device": str(device),
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result, outcome.model


def execute(jobs: Sequence[Job], *, results_path: Path, device: torch.device, progress: bool = True,
            console: Any = None, write: bool = True, after_job: Callable[[Job, nn.Module], None] | None = None,
            context_parallel: int = 1) -> None:
    """Train ``jobs`` one after the other, appending each record as it finishes (rank 0 only writes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        overall = bar.add_task("all runs", total=len(jobs))
        for job in jobs:
            current = bar.add_task(f"{job.task} {job.label} {job.mechanism} seed {job.seed}",
                                   total=job.config.steps)
            result, model = run_job(job, device=device, on_step=lambda step, t=current: bar.update(t, completed=step),
                                    context_parallel=context_parallel)
            if write:
                append_result(results_path, result)
            if after_job is not None:
                after_job(job, model)
            bar.update(current, description=f"{job.task} {job.label} {job.mechanism} seed {job.seed}: "
                                            f"{result['metric']}={result['value']:.4g}")
            bar.update(overall, advance=1)
