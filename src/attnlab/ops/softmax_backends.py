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
an enclosing ``sdpa_kernel``) leaves the order.
:func:`attnlab.bench.softmax_backends.measure_softmax_backends` times the backends when a person
asks for it (``attnlab bench speed --softmax-backends`` calls it); the op never calls it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "AUTO_DEVICE_TYPES",
    "BACKENDS",
    "SdpaCall",
    "available_sdpa_backends",
    "choose_backends",
    "clear_softmax_backend_cache",
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
@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:  # fixed per device: asked once, not per call
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


# What impl="auto" decided so far: the rule's answers, reused for the same call and listed by
# softmax_backend_report() (the rule is pure, so reusing an answer changes nothing).
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
    order = _SEEN.get(call)
    if order is None:  # the rule is pure: its answer for a call never changes
        order = _SEEN[call] = softmax_backend_order(call)
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


def call_as_dict(call: SdpaCall) -> dict[str, Any]:
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
    return [{**call_as_dict(call), "order": list(order), "backend": order[0] if order else "default"}
            for call, order in _SEEN.items()]


def clear_softmax_backend_cache() -> None:
    """Forget the log of :func:`softmax_backend_report` (the choices do not depend on it)."""
    _SEEN.clear()
