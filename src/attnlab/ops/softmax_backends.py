"""The fastest SDPA backend for softmax attention, measured once per configuration and cached.

``torch.nn.functional.scaled_dot_product_attention`` has several CUDA backends (cuDNN,
FlashAttention-2, memory-efficient, math) and which one it picks on its own depends on the torch
version. On one H200 the cuDNN backend ran causal bf16 attention 1.6-1.8x faster than the
FlashAttention-2 backend (``shared/anchors/gpu_h200.md``). ``softmax_attention(impl="auto")``
therefore times the backends that apply, once per (device, dtype, head dims, mask kind, grouped
heads), forward plus backward on a fixed probe shape, caches the fastest and uses it from then on.
:func:`softmax_backend_report` shows what was measured and chosen.

Only devices in :data:`AUTO_DEVICE_TYPES` (CUDA) are measured; on the CPU SDPA keeps its own dispatch.
``ATTNLAB_SDPA_BACKEND=cudnn|flash|efficient|math|default`` forces one backend (no measurement).
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "AUTO_DEVICE_TYPES",
    "BACKENDS",
    "BackendChoice",
    "BackendKey",
    "choose_backend",
    "clear_softmax_backend_cache",
    "measure_backends",
    "sdpa_with_backend",
    "softmax_backend_report",
]

# "default" is SDPA's own choice (nothing forced); the others force one backend.
BACKENDS: dict[str, SDPBackend | None] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "default": None,
}
# Measured by "auto" (math is never the fastest on a GPU and needs O(N^2) memory).
CANDIDATES: tuple[str, ...] = ("cudnn", "flash", "efficient", "default")
AUTO_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
# Probe: batch, query/key length (heads and head dims come from the call being served).
PROBE_BATCH, PROBE_LENGTH = 4, 2048
ENV_FORCE = "ATTNLAB_SDPA_BACKEND"


@dataclass(frozen=True)
class BackendKey:
    """What the choice depends on: device, dtype, head dims, mask kind, grouped heads."""

    device: str
    dtype: str
    head_dim: int
    value_dim: int
    mask_kind: str  # "none" | "causal" | "mask"
    gqa: bool


@dataclass
class BackendChoice:
    """The outcome of one measurement: median ms per backend (forward + backward), refusals, choice."""

    key: BackendKey
    backend: str  # a name of BACKENDS
    times_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    probe_shape: tuple[int, int, int, int] = (0, 0, 0, 0)
    forced: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.key.device, "dtype": self.key.dtype, "head_dim": self.key.head_dim,
            "value_dim": self.key.value_dim, "mask_kind": self.key.mask_kind, "gqa": self.key.gqa,
            "backend": self.backend, "times_ms": dict(self.times_ms), "errors": dict(self.errors),
            "probe_shape": list(self.probe_shape), "forced": self.forced,
        }


_CACHE: dict[BackendKey, BackendChoice] = {}
_LOCK = threading.Lock()


@functools.cache
def _cuda_label(index: int) -> str:
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return _cuda_label(device.index if device.index is not None else torch.cuda.current_device())
    return str(device)


def mask_kind_of(*, is_causal: bool, attn_mask: torch.Tensor | None) -> str:
    """"mask" when a mask tensor is given, else "causal" or "none"."""
    if attn_mask is not None:
        return "mask"
    return "causal" if is_causal else "none"


def backend_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                attn_mask: torch.Tensor | None) -> BackendKey:
    return BackendKey(_device_label(q.device), str(q.dtype).removeprefix("torch."), q.shape[-1], v.shape[-1],
                      mask_kind_of(is_causal=is_causal, attn_mask=attn_mask), k.shape[1] != q.shape[1])


def sdpa_with_backend(backend: str | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                      enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with one backend forced (``None`` / "default": SDPA's choice)."""
    chosen = BACKENDS[backend] if backend is not None else None
    if chosen is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    with sdpa_kernel([chosen]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(run: Callable[[], None], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median wall time of ``run`` in ms, with CUDA events on a GPU and a host clock elsewhere."""
    for _ in range(warmup):
        run()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_backends(key: BackendKey, *, device: torch.device, heads: int, kv_heads: int,
                     candidates: tuple[str, ...] = CANDIDATES, batch: int = PROBE_BATCH,
                     length: int = PROBE_LENGTH, warmup: int = 2, repeats: int = 5, seed: int = 0,
                     timer: Callable[[str, Callable[[], None]], float] | None = None) -> BackendChoice:
    """Time forward + backward of each candidate backend on random probe inputs; pick the fastest.

    The probe is ``q [batch, heads, length, head_dim]``, ``k, v [batch, kv_heads, length, *]`` in
    ``key.dtype`` with the key's mask kind ("mask": a boolean causal mask tensor). A backend that
    refuses the configuration (or returns non-finite values) is recorded in ``errors`` and skipped.
    ``timer(name, step)`` returns the ms of one backend's step (default: median of ``repeats`` runs
    after ``warmup``, with CUDA events on a GPU).
    """
    if timer is None:
        def timer(name: str, step: Callable[[], None]) -> float:
            return _median_ms(step, device, warmup=warmup, repeats=repeats)

    dtype = getattr(torch, key.dtype)
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype).requires_grad_(True)

    q = draw(batch, heads, length, key.head_dim)  # (B, H, N, D)
    k = draw(batch, kv_heads, length, key.head_dim)  # (B, H_kv, N, D)
    v = draw(batch, kv_heads, length, key.value_dim)  # (B, H_kv, N, Dv)
    grad = torch.randn(batch, heads, length, key.value_dim, generator=generator, device=device, dtype=dtype)
    mask = None
    if key.mask_kind == "mask":
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    is_causal = key.mask_kind == "causal"

    choice = BackendChoice(key, "default", probe_shape=(batch, heads, length, key.head_dim))
    for name in candidates:
        def step(name: str = name) -> None:
            out = sdpa_with_backend(name, q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=key.gqa)
            out.backward(grad)
            q.grad = k.grad = v.grad = None

        try:
            with torch.no_grad():
                probe = sdpa_with_backend(name, q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=key.gqa)
            if not bool(torch.isfinite(probe).all()):
                raise RuntimeError("non-finite output")
            choice.times_ms[name] = timer(name, step)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            choice.errors[name] = _first_line(error)
    if choice.times_ms:
        choice.backend = min(choice.times_ms, key=choice.times_ms.__getitem__)
    return choice


def choose_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                   attn_mask: torch.Tensor | None) -> str | None:
    """The backend ``softmax_attention(impl="auto")`` uses for these inputs, or ``None`` (SDPA's own).

    ``None`` off :data:`AUTO_DEVICE_TYPES`, and while compiling or capturing a CUDA graph when
    nothing is cached yet (no measurement can run there).
    """
    if q.device.type not in AUTO_DEVICE_TYPES:
        return None
    key = backend_key(q, k, v, is_causal=is_causal, attn_mask=attn_mask)
    cached = _CACHE.get(key)
    if cached is not None:
        return None if cached.backend == "default" else cached.backend
    forced = os.environ.get(ENV_FORCE)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_FORCE}={forced!r} is not one of {', '.join(BACKENDS)}")
        choice = BackendChoice(key, forced, forced=True)
    else:
        if torch.compiler.is_compiling():
            return None
        if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        with _LOCK:
            if key not in _CACHE:
                with torch.enable_grad():
                    _CACHE[key] = measure_backends(key, device=q.device, heads=q.shape[1], kv_heads=k.shape[1],
                                                   batch=PROBE_BATCH, length=PROBE_LENGTH)
            choice = _CACHE[key]
    _CACHE.setdefault(key, choice)
    return None if choice.backend == "default" else choice.backend


def record_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                   attn_mask: torch.Tensor | None, backend: str, error: Exception) -> None:
    """Note that ``backend`` refused a call it had won on the probe (the op then used SDPA's choice)."""
    choice = _CACHE.get(backend_key(q, k, v, is_causal=is_causal, attn_mask=attn_mask))
    if choice is not None:
        choice.errors[f"{backend} (call {tuple(q.shape)})"] = _first_line(error)


def softmax_backend_report() -> list[dict[str, Any]]:
    """Every configuration measured so far: the key, median ms per backend, refusals and the choice.

    One entry looks like ``{"device": "cuda:0 NVIDIA H200", "dtype": "bfloat16", "head_dim": 128,
    "value_dim": 128, "mask_kind": "causal", "gqa": False, "backend": "cudnn", "times_ms": {"cudnn": ...,
    "flash": ..., ...}, "errors": {...}, "probe_shape": [4, 16, 2048, 128], "forced": False}``.
    Empty until a call on a CUDA device (the CPU keeps SDPA's own dispatch).
    """
    return [choice.as_dict() for choice in _CACHE.values()]


def clear_softmax_backend_cache() -> None:
    """Forget every measurement (the next CUDA call measures again)."""
    with _LOCK:
        _CACHE.clear()
