"""The training loop of the quality benchmark: AdamW, linear warm-up then cosine decay, fresh batches.

:func:`train_loop` knows nothing about tasks: a task hands it a sampler, a loss and an evaluation
(:mod:`attnlab.bench.quality_tasks`). Under ``torch.distributed`` (``attnlab bench quality --nproc``)
the model is wrapped in DistributedDataParallel and each rank draws its share of every batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["TrainOutcome", "train_loop", "distributed_rank_and_world", "LOSS_CURVE_POINTS"]

LOSS_CURVE_POINTS = 60


@dataclass
class TrainOutcome:
    """What one training run gives: the evaluation metrics, the loss curve ``[[step, mean loss], ...]``
    (about :data:`LOSS_CURVE_POINTS` points) and the trained model."""

    metrics: dict[str, float]
    loss_curve: list[list[float]]
    model: nn.Module


def distributed_rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` under an initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_loop(model: nn.Module, *, steps: int, lr: float, weight_decay: float, batch_size: int, seed: int,
               sample: Callable[[torch.Generator, int], Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
               evaluate: Callable[[nn.Module], dict[str, float]], device: torch.device,
               on_step: Callable[[int], None] | None = None) -> TrainOutcome:
    """AdamW with linear warm-up (5 % of the steps) and a cosine decay to zero; fresh batches each step.

    Under ``torch.distributed`` (``--nproc``) the model is wrapped in DistributedDataParallel, each
    rank draws ``batch_size / world_size`` examples from its own stream and gradients are averaged.
    """
    rank, world = distributed_rank_and_world()
    if batch_size % world != 0:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes {world}")
    torch.manual_seed(seed)
    model = model.to(device)
    trained: nn.Module = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(1_000_003 * (seed + 1) + rank)
    every = max(1, steps // LOSS_CURVE_POINTS)
    curve: list[list[float]] = []
    running, count = 0.0, 0
    model.train()
    for step in range(steps):
        batch = sample(generator, batch_size // world)
        loss = loss_fn(trained, _to(batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += float(loss.detach())
        count += 1
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append([step + 1, running / count])
            running, count = 0.0, 0
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    with torch.no_grad():
        metrics = evaluate(model)
    if curve and not math.isfinite(curve[-1][1]):
        metrics["diverged"] = 1.0
    return TrainOutcome(metrics, curve, model)


def _to(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a tuple/list of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(_to(b, device) for b in batch)
    return batch
