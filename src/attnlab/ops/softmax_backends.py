"""Which SDPA backend ``softmax_attention(impl="auto")`` runs: a fixed rule, and timings on request.

``torch.nn.functional.scaled_dot_product_attention`` has four CUDA backends: cuDNN's fused attention,
FlashAttention-2 ("FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv 2307.08691), memory-efficient attention ("Self-attention Does Not Need O(n^2) Memory",
arXiv 2112.05682) and math (the written-out softmax of "Attention Is All You Need", arXiv 1706.03762).
The one it picks on its own depends on the torch version and build.
``impl="auto"`` therefore passes SDPA an explicit priority order, decided by
:func:`softmax_backend_order`: a pure function of the device type, the CUDA capability, the dtype,
the head dims, the mask kind, grouped heads and the set of backends enabled in this process. PyTorch
runs the first backend of that order whose own checks accept the call. Nothing is timed inside a
forward and no measurement steers it, so every process (and every rank of a distributed job) makes the same choice for
the same inputs; ``torch.nn.attention.sdpa_kernel`` around a call still restricts what may run.

The rule, on CUDA (off CUDA, SDPA keeps its own dispatch):

1. cuDNN first on Hopper (capability 9.x) for float16/bfloat16 with equal query and value head dims
   of at most 128 (a multiple of 8), no mask tensor (none or causal) and no grouped heads: there it
   ran causal bf16 attention 1.6-1.9x faster than FlashAttention-2 on an H200 (``docs/benchmarks.md``);
2. then FlashAttention-2 (capability 8.0 and up, float16/bfloat16, equal head dims up to 256, no
   mask tensor);
3. then memory-efficient attention (capability 5.0 and up; bfloat16 from 8.0; not float64);
4. then math, which runs everything.

A backend missing from this torch build or disabled (``torch.backends.cuda.enable_*_sdp(False)``,
an enclosing ``sdpa_kernel``) leaves the order. :func:`measure_softmax_backends` times the backends
when a person asks for it (``attnlab bench speed --softmax-backends`` calls it) and returns the
table; the op never calls it.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "AUTO_DEVICE_TYPES",
    "BACKENDS",
    "BackendTable",
    "SdpaCall",
    "available_sdpa_backends",
    "choose_backends",
    "clear_softmax_backend_cache",
    "measure_softmax_backends",
    "sdpa_call_of",
    "sdpa_with_backend",
    "sdpa_with_backends",
    "softmax_backend_order",
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
# Devices where impl="auto" passes an order; elsewhere SDPA's own dispatch runs.
AUTO_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
MaskKind = Literal["none", "causal", "mask"]
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SdpaCall:
    """Everything :func:`softmax_backend_order` looks at; build one from tensors with :func:`sdpa_call_of`.

    Attributes:
        device_type: "cuda", "cpu", ...
        capability: CUDA compute capability ``(major, minor)``, ``None`` off CUDA.
        dtype: dtype of q, k, v.
        head_dim / value_dim: D of q and k, Dv of v.
        mask_kind: "none", "causal" (SDPA's ``is_causal``) or "mask" (a mask tensor).
        gqa: k, v have fewer heads than q.
        available: backends compiled into this torch and enabled now (names of :data:`BACKENDS`).
    """

    device_type: str
    capability: tuple[int, int] | None
    dtype: torch.dtype
    head_dim: int
    value_dim: int
    mask_kind: MaskKind
    gqa: bool
    available: frozenset[str]


def softmax_backend_order(call: SdpaCall) -> tuple[str, ...]:
    """The SDPA backends to try for ``call``, first choice first; ``()`` means SDPA's own dispatch.

    A pure function of ``call`` (the rule is in the module docstring). PyTorch runs the first backend
    of the order whose own checks accept the call; math, last, accepts everything.
    """
    if call.device_type != "cuda" or call.capability is None:
        return ()
    half = call.dtype in _HALF
    same_dims = call.head_dim == call.value_dim
    no_mask_tensor = call.mask_kind != "mask"
    order: list[str] = []
    if (call.capability[0] == 9 and half and same_dims and call.head_dim <= 128 and call.head_dim % 8 == 0
            and no_mask_tensor and not call.gqa):
        order.append("cudnn")
    if call.capability >= (8, 0) and half and same_dims and call.head_dim <= 256 and no_mask_tensor:
        order.append("flash")
    if (call.capability >= (5, 0) and call.dtype != torch.float64
            and (call.dtype != torch.bfloat16 or call.capability >= (8, 0))):
        order.append("efficient")
    order.append("math")
    return tuple(name for name in order if name in call.available)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _built_in() -> tuple[bool, bool]:
    """Whether this torch build has cuDNN attention (cuDNN 9 or newer) and FlashAttention (fixed per process)."""
    cudnn = torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000
    return cudnn, torch.backends.cuda.is_flash_attention_available()


def available_sdpa_backends() -> frozenset[str]:
    """The SDPA backends this torch build has and that are enabled now (global flags, ``sdpa_kernel``)."""
    cuda = torch.backends.cuda
    cudnn_built, flash_built = _built_in()
    enabled = {
        "cudnn": cudnn_built and cuda.cudnn_sdp_enabled(),
        "flash": flash_built and cuda.flash_sdp_enabled(),
        "efficient": cuda.mem_efficient_sdp_enabled(),
        "math": cuda.math_sdp_enabled(),
    }
    return frozenset(name for name, on in enabled.items() if on)


def _mask_kind(*, is_causal: bool, attn_mask: torch.Tensor | None) -> MaskKind:
    if attn_mask is not None:
        return "mask"
    return "causal" if is_causal else "none"


def sdpa_call_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                 attn_mask: torch.Tensor | None) -> SdpaCall:
    """The :class:`SdpaCall` of SDPA on ``q [B, H, N, D]``, ``k [B, H_kv, M, D]``, ``v [B, H_kv, M, Dv]``."""
    return SdpaCall(device_type=q.device.type, capability=_capability(q.device), dtype=q.dtype,
                    head_dim=q.shape[-1], value_dim=v.shape[-1],
                    mask_kind=_mask_kind(is_causal=is_causal, attn_mask=attn_mask), gqa=k.shape[1] != q.shape[1],
                    available=available_sdpa_backends())


# What impl="auto" decided so far, for softmax_backend_report(): a log of the rule's answers
# (the rule is pure; nothing here changes what a later call does).
_SEEN: dict[SdpaCall, tuple[str, ...]] = {}
_TORCH_ORDER_READY: set[str] = set()


def _let_torch_set_its_default_order(q: torch.Tensor) -> None:
    """Have PyTorch set its own default SDPA priority before ``sdpa_kernel`` first saves and restores it.

    Recent PyTorch sets its default order lazily, at its first backend selection on CUDA (cuDNN first
    on some GPUs). If that first selection happened inside our ``sdpa_kernel`` context, it would
    replace our order for that call, and leaving the context would restore the order saved before
    the initialisation, so plain SDPA calls would lose PyTorch's default for the rest of the process.
    ``torch._fused_sdp_choice`` runs that selection without running attention; once per device type.
    """
    if q.device.type in _TORCH_ORDER_READY:
        return
    probe = q.new_empty(1, 1, 1, q.shape[-1])  # (1, 1, 1, D); only its dtype, device and shape are read
    torch._fused_sdp_choice(probe, probe, probe)
    _TORCH_ORDER_READY.add(q.device.type)


def choose_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                    attn_mask: torch.Tensor | None) -> tuple[str, ...]:
    """The backend order ``softmax_attention(impl="auto")`` passes to SDPA for these inputs.

    ``()`` (SDPA's own dispatch) off :data:`AUTO_DEVICE_TYPES` and while ``torch.compile`` traces
    (the compiler chooses the attention kernel of the graph itself).
    """
    if q.device.type not in AUTO_DEVICE_TYPES or torch.compiler.is_compiling():
        return ()
    call = sdpa_call_of(q, k, v, is_causal=is_causal, attn_mask=attn_mask)
    order = softmax_backend_order(call)
    if call not in _SEEN:
        _SEEN[call] = order
    if order:
        _let_torch_set_its_default_order(q)
    return order


@contextlib.contextmanager
def _backends(order: Sequence[str]) -> Iterator[None]:
    if not order:
        yield
        return
    with sdpa_kernel([BACKENDS[name] for name in order], set_priority=True):
        yield


def sdpa_with_backends(order: Sequence[str], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                       enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with only the backends of ``order`` enabled, tried in that
    order (``()``: SDPA's own dispatch)."""
    with _backends(order):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)


def sdpa_with_backend(backend: str | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                      enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with one backend forced (``None`` / "default": SDPA's choice)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    order = () if backend in (None, "default") else (backend,)
    return sdpa_with_backends(order, q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                              enable_gqa=enable_gqa)


def _call_as_dict(call: SdpaCall) -> dict[str, Any]:
    return {"device": call.device_type, "capability": list(call.capability) if call.capability else None,
            "dtype": str(call.dtype).removeprefix("torch."), "head_dim": call.head_dim,
            "value_dim": call.value_dim, "mask_kind": call.mask_kind, "gqa": call.gqa,
            "available": sorted(call.available)}


def softmax_backend_report() -> list[dict[str, Any]]:
    """What ``softmax_attention(impl="auto")`` chose so far in this process, one entry per distinct call.

    An entry looks like ``{"device": "cuda", "capability": [9, 0], "dtype": "bfloat16", "head_dim": 128,
    "value_dim": 128, "mask_kind": "causal", "gqa": False, "available": [...], "order": ["cudnn",
    "flash", "efficient", "math"], "backend": "cudnn"}`` (``backend``: the first of the order, or
    "default" for SDPA's own dispatch). Empty until a call on a CUDA device.
    """
    return [{**_call_as_dict(call), "order": list(order), "backend": order[0] if order else "default"}
            for call, order in _SEEN.items()]


def clear_softmax_backend_cache() -> None:
    """Forget the log of :func:`softmax_backend_report` (the choices do not depend on it)."""
    _SEEN.clear()


# ---------------------------------------------------------------------------------------------------
# Timing on request: never called by the op.


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
        return {**_call_as_dict(self.call), "rule_order": list(self.rule_order), "times_ms": dict(self.times_ms),
                "errors": dict(self.errors), "fastest": self.fastest, "shape": list(self.shape), "mode": self.mode}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _median_ms(run: Callable[[], None], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median wall time of ``run`` in ms, with CUDA events on a GPU and a host clock elsewhere."""
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
    ms of one backend's step (default: median of ``repeats`` runs after ``warmup``, CUDA events on a
    GPU). This is the only place attnlab times SDPA backends; call it when you want the numbers.
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
            return _median_ms(step, device, warmup=warmup, repeats=repeats)

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
