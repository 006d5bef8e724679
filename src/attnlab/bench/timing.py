"""Wall-clock timing of one call: median and quartiles of repeated calls after a warm-up.

On the CPU a host clock around each call; on a GPU ``triton.testing.do_bench`` (CUDA events) when
triton imports, else CUDA events around each call.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "time_callable"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one call: median, quartiles, and how many calls were timed."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    repeats: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q75_ms - self.q25_ms) / self.median_ms if self.median_ms > 0 else 0.0


def _quartiles(times: Sequence[float]) -> Timing:
    ordered = sorted(times)
    if len(ordered) == 1:
        return Timing(ordered[0], ordered[0], ordered[0], 1)
    q = statistics.quantiles(ordered, n=4, method="inclusive")
    return Timing(statistics.median(ordered), q[0], q[2], len(ordered))


def time_callable(fn: Callable[[], Any], *, device: str | torch.device = "cpu", warmup: int = 1, repeats: int = 3,
                  max_repeats: int = 20, min_seconds: float = 0.0, max_seconds: float = math.inf,
                  gpu_warmup_ms: int = 25, gpu_rep_ms: int = 100,
                  clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time ``fn()`` (ms per call): ``warmup`` untimed calls, then at least ``repeats`` timed calls.

    CPU: a host clock around each call; calls continue until ``min_seconds`` of timed calls or
    ``max_repeats``, and stop after ``max_seconds`` (warm-up included) even below ``repeats`` (at
    least one timed call: a slow cell costs a few calls, not ``repeats`` of them).
    CUDA: ``triton.testing.do_bench`` (CUDA events, median and quartiles) when
    triton imports, else CUDA events around each of the calls.
    """
    device = torch.device(device)
    if warmup < 0 or repeats < 1 or max_repeats < repeats:
        raise ValueError(f"need warmup >= 0 and 1 <= repeats <= max_repeats, got {warmup}, {repeats}, {max_repeats}")
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            q25, median, q75 = do_bench(fn, warmup=gpu_warmup_ms, rep=gpu_rep_ms, quantiles=[0.25, 0.5, 0.75])
            return Timing(float(median), float(q25), float(q75), -1)
        for _ in range(max(warmup, 1)):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return _quartiles(times)
    budget_start = clock()
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while not times or (
            (len(times) < repeats or (spent < min_seconds and len(times) < max_repeats))
            and clock() - budget_start < max_seconds):
        t0 = clock()
        fn()
        elapsed = clock() - t0
        times.append(elapsed * 1e3)
        spent += elapsed
    return _quartiles(times)
