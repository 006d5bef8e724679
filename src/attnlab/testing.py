"""Helpers shared by the conformance suite and ``attnlab check``: random inputs, errors, options."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from attnlab.registry import Mechanism

__all__ = ["random_qkv", "relative_error", "first_output", "run_options", "CheckResult", "check_mechanism"]


def random_qkv(record: Mechanism, *, dtype: torch.dtype = torch.float32, batch: int = 2,
               length: int | None = None, key_length: int | None = None, head_dim: int | None = None,
               value_dim: int | None = None, heads: int | None = None, kv_heads: int | None = None,
               generator: torch.Generator | None = None, requires_grad: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q [B, H, N, D]``, ``k, v [B, H_kv, M, D|Dv]`` sized by ``record.check`` unless overridden."""
    c = record.check
    N = length or c.length
    M = key_length or N
    D = head_dim or c.head_dim
    Dv = value_dim or (c.value_dim if (c.value_dim and record.supports_value_dim) else D)
    H = heads or c.heads
    Hkv = kv_heads or H

    def draw(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=generator, dtype=torch.float64) * c.input_scale
        return x.to(dtype).requires_grad_(requires_grad)

    return draw(batch, H, N, D), draw(batch, Hkv, M, D), draw(batch, Hkv, M, Dv)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius), computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def first_output(result: Any) -> torch.Tensor:
    """The attention output of an op's result (``(output, state)`` tuples give ``output``)."""
    return result[0] if isinstance(result, tuple) else result


def run_options(record: Mechanism, *, causal: bool, bf16: bool = False) -> dict[str, Any]:
    """The options the checks pass to ``record``: its check options plus ``causal``."""
    c = record.check
    options = dict(c.bf16_options if (bf16 and c.bf16_options is not None) else c.options)
    options["causal"] = causal
    return options


@dataclass(frozen=True)
class CheckResult:
    """Outcome of running one mechanism against its reference."""

    name: str
    causal: bool
    relative_error: float
    tolerance: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance


def check_mechanism(record: Mechanism, *, causal: bool, seed: int = 0) -> CheckResult:
    """Run ``record``'s default path in float32 and its reference in float64 on the same random input."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(record, dtype=torch.float32, generator=generator)
    options = run_options(record, causal=causal)
    start = time.perf_counter()
    out = first_output(record(q, k, v, **options))
    seconds = time.perf_counter() - start
    expected = first_output(record.run_reference(q.double(), k.double(), v.double(), **options))
    tolerance = max(record.check.float32_tolerance * 10, 1e-4)
    return CheckResult(record.name, causal, relative_error(out, expected), tolerance, seconds)
