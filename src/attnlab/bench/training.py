"""The training loop of the quality benchmark: AdamW, linear warm-up then cosine decay, fresh batches.

:func:`train_loop` knows nothing about tasks: a task hands it a sampler, a loss and an evaluation
(:mod:`attnlab.bench.quality_tasks`). Under ``torch.distributed`` (``attnlab bench quality --nproc``)
the model is wrapped in DistributedDataParallel and each rank draws its share of every batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["TrainOutcome", "train_loop", "distributed_rank_and_world", "LOSS_CURVE_POINTS"]

LOSS_CURVE_POINTS = 60


@dataclass
class TrainOutcome:
    """What one training run gives: the test metrics, the loss curve ``[[step, mean loss], ...]``
    (about :data:`LOSS_CURVE_POINTS` points), the trained model, the metrics on the validation split
    (empty without one) and ``train_step_s``, the mean wall time of one training step in seconds
    (sampling, forward, backward, optimizer; evaluation, progress callbacks and, when there are
    several steps, the first one, which pays for one-time work such as kernel compilation, excluded)."""

    metrics: dict[str, float]
    loss_curve: list[list[float]]
    model: nn.Module
    validation_metrics: dict[str, float] = field(default_factory=dict)
    train_step_s: float = math.nan


def distributed_rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` under an initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_loop(model: nn.Module, *, steps: int, lr: float, weight_decay: float, batch_size: int, seed: int,
               sample: Callable[[torch.Generator, int], Any], loss_fn: Callable[..., torch.Tensor],
               evaluate: Callable[[nn.Module], dict[str, float]], device: torch.device,
               on_step: Callable[[int], None] | None = None, context_parallel: int = 1,
               validate: Callable[[nn.Module], dict[str, float]] | None = None) -> TrainOutcome:
    """AdamW with linear warm-up (5 % of the steps) and a cosine decay to zero; fresh batches each step.

    After training, ``evaluate(model)`` gives the test metrics and ``validate(model)`` (if given) the
    metrics on a validation split, on which a learning rate is chosen without looking at the test set.

    Under ``torch.distributed`` (``--nproc``) the model is wrapped in DistributedDataParallel, each
    rank draws ``batch_size / world_size`` examples from its own stream and gradients are averaged.
    ``context_parallel=C`` (``--context-parallel``): consecutive groups of ``C`` ranks split each
    sequence (:mod:`attnlab.distributed`; a decoder with ``set_context_parallel`` and batches
    ``(inputs [B, N], labels [B, N])``); the ``world / C`` groups are data-parallel replicas. The loss is
    the mean over the labelled positions of the whole sequences (``loss_fn(model, batch,
    reduction="sum")`` on each shard, divided by the group's count), gradients are summed within a
    group and averaged over the replicas; evaluation runs on whole sequences afterwards.
    """
    rank, world = distributed_rank_and_world()
    group, replicas = None, world
    if context_parallel > 1:
        group, replicas = _context_parallel_group(rank, world, context_parallel)
        if not hasattr(model, "set_context_parallel"):
            raise ValueError(f"context_parallel={context_parallel} needs a decoder that shards its sequence "
                             f"(attnlab.models.LanguageModel), got {type(model).__name__}")
    if batch_size % replicas != 0:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of data-parallel replicas "
                         f"{replicas}")
    torch.manual_seed(seed)
    model = model.to(device)
    trained: nn.Module = model
    if group is not None:
        model.set_context_parallel(group)
    elif world > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # the ranks of one context-parallel group draw the same batch (each then keeps its shard)
    generator = torch.Generator().manual_seed(1_000_003 * (seed + 1) + rank // context_parallel)
    every = max(1, steps // LOSS_CURVE_POINTS)
    curve: list[list[float]] = []
    running, count = 0.0, 0
    callback_s = 0.0  # time spent in on_step (progress display), not part of a training step
    model.train()
    _synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        batch = sample(generator, batch_size // replicas)
        if group is None:
            loss = loss_fn(trained, _to(batch, device))
        else:
            loss = _sharded_loss(loss_fn, model, _to(batch, device), group)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if group is not None:
            _sum_gradients(model, replicas)
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss, group=group)  # the whole sequences' loss, for the curve
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += float(loss.detach())
        count += 1
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append([step + 1, running / count])
            running, count = 0.0, 0
        if on_step is not None:
            before = time.perf_counter()
            on_step(step + 1)
            callback_s += time.perf_counter() - before
        if step == 0 and steps > 1:  # the first step compiles kernels and allocates: time the steady state
            _synchronize(device)
            start, callback_s = time.perf_counter(), 0.0
    _synchronize(device)  # queued GPU work belongs to the steps, not to the evaluation
    train_step_s = (time.perf_counter() - start - callback_s) / max(1, steps - 1)
    if group is not None:
        model.set_context_parallel(None)  # evaluate on whole sequences (every rank holds the same weights)
    model.eval()
    with torch.no_grad():
        metrics = evaluate(model)
        validation = validate(model) if validate is not None else {}
    if curve and not math.isfinite(curve[-1][1]):
        metrics["diverged"] = 1.0
        if validate is not None:
            validation["diverged"] = 1.0
    return TrainOutcome(metrics, curve, model, validation, train_step_s)


def _synchronize(device: torch.device) -> None:
    """Wait for the queued kernels of ``device`` (CUDA launches are asynchronous; a timer must not stop early)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _context_parallel_group(rank: int, world: int, size: int) -> tuple[Any, int]:
    """This rank's group of ``size`` consecutive ranks (every rank creates every group), and the replica count."""
    if world % size != 0 or world < size:
        raise ValueError(f"context_parallel={size} must divide the number of processes {world}")
    groups = [torch.distributed.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    return groups[rank // size], world // size


def _sharded_loss(loss_fn: Callable[..., torch.Tensor], model: nn.Module, batch: Any, group: Any) -> torch.Tensor:
    """This shard's part of the mean loss over the labelled positions of the group's whole sequences."""
    from attnlab.distributed import shard_sequence
    from attnlab.tasks.mqar import IGNORE_INDEX

    inputs, labels = (shard_sequence(x, group=group, dim=1) for x in batch)  # (B, n) each
    count = (labels != IGNORE_INDEX).sum().to(torch.float64)
    torch.distributed.all_reduce(count, group=group)
    return loss_fn(model, (inputs, labels), reduction="sum") / count.clamp_min(1).to(torch.float32)


def _sum_gradients(model: nn.Module, replicas: int) -> None:
    """Sum the gradients over every rank (the shards of a sequence add up), averaged over the replicas."""
    for parameter in model.parameters():  # every rank reduces every parameter, in the same order
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        torch.distributed.all_reduce(parameter.grad)
        parameter.grad /= replicas


def _to(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or a tuple/list of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(_to(b, device) for b in batch)
    return batch
