"""Helpers shared by the conformance suite and ``attnlab check``: random inputs, errors, options."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch

from attnlab.registry import Mechanism

__all__ = ["random_qkv", "relative_error", "first_output", "run_options", "CheckResult", "check_mechanism",
           "layer_has_reference", "check_layer", "why_not_checkable"]


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


def layer_has_reference(record: Mechanism) -> bool:
    """Whether ``record``'s layer can run its own reference: its constructor takes ``impl="reference"``."""
    if record.layer is None:
        return False
    try:
        parameters = inspect.signature(record.layer).parameters
    except (TypeError, ValueError):
        return False
    return "impl" in parameters


def why_not_checkable(record: Mechanism) -> str | None:
    """``None`` when ``attnlab check`` can compare ``record`` with a reference, else the reason it cannot."""
    if record.op is not None and record.reference is not None:
        return None
    if layer_has_reference(record):
        return None
    if record.op is not None:
        return f"{record.name} has an op but no reference implementation registered"
    return (f"{record.name} is a layer (its own parameters) without a reference implementation in the registry; "
            f"its conformance checks run in pytest (tests/test_layer_conformance.py -k {record.name})")


def check_layer(record: Mechanism, *, causal: bool, seed: int = 0) -> CheckResult:
    """Run ``record``'s layer with its default ``impl`` in float32 and with ``impl="reference"`` in float64,
    same parameters (same seed) and same random input ``x [B, N, dim]``, built as the layer conformance
    tests build it (``check.layer_build`` / ``check.layer_inputs`` when the record sets them)."""
    if not layer_has_reference(record):
        raise ValueError(f"record {record.name!r}: {why_not_checkable(record)}")
    c = record.check
    dim = c.heads * c.head_dim

    def build(dtype: torch.dtype, **options: Any) -> torch.nn.Module:
        torch.manual_seed(seed)
        if c.layer_build is not None:
            layer = c.layer_build(dim, c.heads, causal=causal, **options)
        else:
            layer = record.layer(dim, c.heads, causal=causal, **options)
        return layer.to(dtype).eval()

    fast, reference = build(torch.float32), build(torch.float64, impl="reference")
    generator = torch.Generator().manual_seed(seed)
    if c.layer_inputs is not None:
        inputs, _ = c.layer_inputs(reference, batch=2, length=c.length, dim=dim, dtype=torch.float64,
                                   generator=generator)
        inputs = dict(inputs)
    else:
        inputs = {"x": torch.randn(2, c.length, dim, generator=generator, dtype=torch.float64)}  # (B, N, dim)
    low = {name: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
           for name, x in inputs.items()}
    with torch.no_grad():
        start = time.perf_counter()
        out = first_output(fast(**low))
        seconds = time.perf_counter() - start
        expected = first_output(reference(**inputs))
    tolerance = max(c.float32_tolerance * 10, 1e-4)
    return CheckResult(record.name, causal, relative_error(out, expected), tolerance, seconds)
