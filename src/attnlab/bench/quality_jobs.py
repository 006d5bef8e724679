"""One training run of the quality benchmark: a :class:`Job` and :func:`run_job`, which trains and scores it.

A job is (task, mechanism, seed, config, preset); :func:`run_job` trains and scores it and returns
its JSON record. The loops that run a list of jobs (in this process, in worker processes, on Ray)
are in :mod:`attnlab.bench.runner`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import attnlab
from attnlab.bench.quality_tasks import TASKS, config_label
from attnlab.bench.results import versions
from attnlab.bench.training import distributed_rank_and_world

__all__ = ["Job", "RESULT_KEY", "run_job"]

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

