"""One training run of the quality benchmark: a :class:`Job` and :func:`run_job`, which trains and scores it.

A job is (task, mechanism, seed, config, preset, sweep); :func:`run_job` trains and scores it and
returns its JSON record. The loops that run a list of jobs (in this process, in worker processes, on
Ray) are in :mod:`attnlab.bench.runner`.

Learning-rate sweeps follow zoology ("Zoology: Measuring and Improving Recall in Efficient Language
Models", arXiv 2312.04927): every rate of a sweep is a separate job, with its own record and its own
key (:data:`RESULT_KEY` holds ``"lr"``), so a sweep resumes point by point. The record fields a
report needs to choose the rate and report the result (the contract between this module and the
reports):

- ``"lr"`` (float): the learning rate this run trained at (also ``config["lr"]``).
- ``"sweep"`` (list of floats): every rate planned for this (task, variant) in this run, this one
  included; length 1 means the run was not swept (``smoke`` and ``quick``, or ``--lrs`` with one rate).
- ``"validation_value"`` (float) and ``"validation_metrics"`` (dict): the task's ``"metric"`` and the
  other scores on the VALIDATION split, disjoint from the test set (another generator stream for the
  synthetic tasks; images / articles held out of the training data for digits and wikitext). The
  rate is chosen on these: per (task, variant, mechanism), the rate with the best mean
  ``validation_value`` over seeds (``"higher_is_better"`` says which way is best).
- ``"value"`` (float) and ``"metrics"`` (dict): the same on the TEST split; what a table reports at
  the chosen rate. Never used to choose.
- ``"train_step_s"`` (float): mean wall seconds per training step (batch, forward, backward,
  optimizer), measured inside the training loop; evaluation and progress display excluded.
- The variant of a record is ``"config_label"`` (it omits the rate; a run whose steps were changed
  from the preset's, ``--steps``, says so: ``V8192-L64-P8-d64-625steps``); ``"config"`` differs
  between the rates of one sweep only in ``"lr"``.
- ``"mechanism"`` is the mechanism spec, its options included
  (``linear:feature_map=taylor:feature_dim=16``, :mod:`attnlab.mechanism_spec`);
  ``"mixer_options"`` all the options the mixers were built with, the mechanism's defaults for the
  task included.

Every run seeds itself from its own ``seed``: the model's initialisation (for a given mechanism),
the training batches, the validation and the test sets depend on the seed alone, never on the rate,
the other runs or the order they run in; runs of one seed at different rates or with different
mechanisms see the same data.
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
from attnlab.mechanism_spec import model_spec

__all__ = ["Job", "RESULT_KEY", "run_job"]

RESULT_KEY = ("task", "mechanism", "seed", "lr", "config")


@dataclass(frozen=True)
class Job:
    """One training run: what is recorded and what resume compares.

    ``config.lr`` is the rate this run trains at; ``sweep`` the rates planned for its (task, variant),
    ``()`` for a job outside any sweep (recorded as ``[lr]``). ``mechanism`` is a mechanism spec
    (a registered name, or one with options). ``variant`` is the table label when it is not the
    config's own (``""``), e.g. the preset's label with ``-625steps`` when ``--steps`` changed them.
    """

    task: str
    mechanism: str
    seed: int
    config: Any
    preset: str
    sweep: tuple[float, ...] = ()
    variant: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweep", tuple(float(v) for v in self.sweep))
        if self.variant == config_label(self.task, self.config):
            object.__setattr__(self, "variant", "")
        if self.sweep and self.lr not in self.sweep:
            raise ValueError(f"sweep={self.sweep} does not hold the job's learning rate config.lr={self.lr}")

    @property
    def label(self) -> str:
        return self.variant or config_label(self.task, self.config)

    @property
    def lr(self) -> float:
        return float(self.config.lr)

    def key_record(self) -> dict[str, Any]:
        return {"task": self.task, "mechanism": self.mechanism, "seed": self.seed, "lr": self.lr,
                "config": dataclasses.asdict(self.config)}

    def to_json(self) -> dict[str, Any]:
        return {**self.key_record(), "preset": self.preset, "sweep": list(self.sweep or (self.lr,)),
                "config_label": self.label}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        task = TASKS[data["task"]]
        return cls(data["task"], data["mechanism"], int(data["seed"]), task.config_type(**data["config"]),
                   data["preset"], tuple(data.get("sweep", ())), data.get("config_label", ""))


def run_job(job: Job, *, device: torch.device | None = None, on_step: Callable[[int], None] | None = None,
            context_parallel: int = 1) -> tuple[dict[str, Any], nn.Module]:
    """Train and score one job; the JSON record (without writing it) and the trained model
    (``context_parallel``: ranks that split each sequence, see :func:`attnlab.bench.training.train_loop`)."""
    device = device or torch.device("cpu")
    task = TASKS[job.task]
    spec = model_spec(job.mechanism)
    record = attnlab.get(spec.name)
    torch.manual_seed(job.seed)
    model = task.build(job.config, spec.name, task.causal_for(record), **spec.options)
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
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "value": outcome.metrics[task.metric],
        "metrics": outcome.metrics,
        "validation_value": outcome.validation_metrics[task.metric],
        "validation_metrics": outcome.validation_metrics,
        "train_step_s": outcome.train_step_s,
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

