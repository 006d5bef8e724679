"""Times of the SDPA backends, measured when a person asks (``attnlab bench speed --softmax-backends``).

``softmax_attention(impl="auto")`` never times anything: it follows the fixed rule of
:func:`attnlab.ops.softmax_backends.softmax_backend_order`. This module puts measured times beside
that rule's order for one probe shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from attnlab.bench.timing import time_callable
from attnlab.ops.softmax_backends import (
    BACKENDS,
    MaskKind,
    SdpaCall,
    call_as_dict,
    sdpa_call_of,
    sdpa_with_backend,
    softmax_backend_order,
)

__all__ = ["BackendTable", "measure_softmax_backends"]




@dataclass
class BackendTable:
    """Times of the SDPA backends on one probe shape, from :func:`measure_softmax_backends`.

    Attributes:
        call: the probe as the rule sees it.
        rule_order: what :func:`softmax_backend_order` gives for it (the first is what "auto" runs).
        times_ms: median ms per backend that ran (``mode`` "fwd" or "fwdbwd").
        errors: first line of the error of each backend that refused the probe.
        shape: ``(B, H, H_kv, N, D, Dv)`` of the probe.
        mode: "fwd" or "fwdbwd".
    """

    call: SdpaCall
    rule_order: tuple[str, ...]
    times_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    mode: str = "fwdbwd"

    @property
    def fastest(self) -> str | None:
        """The backend with the lowest median time, or ``None`` when none ran."""
        return min(self.times_ms, key=self.times_ms.__getitem__) if self.times_ms else None

    def as_dict(self) -> dict[str, Any]:
        return {**call_as_dict(self.call), "rule_order": list(self.rule_order), "times_ms": dict(self.times_ms),
                "errors": dict(self.errors), "fastest": self.fastest, "shape": list(self.shape), "mode": self.mode}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def measure_softmax_backends(*, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                             batch: int = 4, heads: int = 16, kv_heads: int | None = None, length: int = 2048,
                             head_dim: int = 128, value_dim: int | None = None, mask_kind: MaskKind = "causal",
                             mode: Literal["fwd", "fwdbwd"] = "fwdbwd",
                             backends: Sequence[str] = ("cudnn", "flash", "efficient", "math", "default"),
                             warmup: int = 2, repeats: int = 5, seed: int = 0,
                             timer: Callable[[str, Callable[[], None]], float] | None = None) -> BackendTable:
    """Time each SDPA backend on random probe inputs and return the table (what the rule picks beside it).

    The probe is ``q [batch, heads, length, head_dim]``, ``k, v [batch, kv_heads, length, *]`` in
    ``dtype`` with the mask kind ("mask": a boolean causal mask tensor). A backend that refuses the
    probe (or returns non-finite values) is recorded in ``errors``. ``timer(name, step)`` returns the
    ms of one backend's step (default: the median of :func:`attnlab.bench.timing.time_callable`
    over ``repeats`` runs after ``warmup``). This is the only place attnlab times SDPA backends; call
    it when you want the numbers.
    """
    device = torch.device(device)
    kv_heads = heads if kv_heads is None else kv_heads
    value_dim = head_dim if value_dim is None else value_dim
    if mask_kind not in ("none", "causal", "mask"):
        raise ValueError(f"mask_kind={mask_kind!r}; expected 'none', 'causal' or 'mask'")
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode={mode!r}; expected 'fwd' or 'fwdbwd'")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"backends contains {unknown}; expected names of {', '.join(BACKENDS)}")
    if timer is None:
        def timer(name: str, step: Callable[[], None]) -> float:
            return time_callable(step, device=device, warmup=warmup, repeats=repeats, max_repeats=repeats).median_ms

    generator = torch.Generator(device=device).manual_seed(seed)
    backward = mode == "fwdbwd"

    def draw(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=generator, device=device, dtype=dtype)
        return x.requires_grad_(backward)

    q = draw(batch, heads, length, head_dim)  # (B, H, N, D)
    k = draw(batch, kv_heads, length, head_dim)  # (B, H_kv, N, D)
    v = draw(batch, kv_heads, length, value_dim)  # (B, H_kv, N, Dv)
    grad = torch.randn(batch, heads, length, value_dim, generator=generator, device=device, dtype=dtype)
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril() if mask_kind == "mask" else None
    is_causal = mask_kind == "causal"
    gqa = kv_heads != heads
    call = sdpa_call_of(q, k, v, is_causal=is_causal, attn_mask=mask)
    table = BackendTable(call, softmax_backend_order(call), shape=(batch, heads, kv_heads, length, head_dim,
                                                                    value_dim), mode=mode)
    for name in backends:
        def step(name: str = name) -> None:
            with torch.set_grad_enabled(backward):
                out = sdpa_with_backend(name, q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
                if backward:
                    out.backward(grad)
                    q.grad = k.grad = v.grad = None

        try:
            with torch.no_grad():
                probe = sdpa_with_backend(name, q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
            if not bool(torch.isfinite(probe).all()):
                raise RuntimeError("non-finite output")
            table.times_ms[name] = timer(name, step)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            table.errors[name] = _first_line(error)
    return table
