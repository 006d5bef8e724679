"""Running a list of quality-benchmark jobs and appending each record to ``results.jsonl``.

:func:`execute` trains jobs one after the other in this process (the sequential runner, and every
torchrun rank of :mod:`attnlab.bench.ddp`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab.bench.quality_jobs import Job, run_job
from attnlab.bench.results import append_result

__all__ = ["execute"]


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
