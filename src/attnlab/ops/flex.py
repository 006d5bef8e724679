"""Compiled FlexAttention with cached block masks: the fused path of the local/sparse ops.

FlexAttention: Dong, Feng, Guessous, Liang, He, "Flex Attention: A Programming Model for Generating
Optimized Attention Kernels" (arXiv 2412.05496). The op computes masked softmax attention
``softmax(scale Q K^T + log(mask)) V`` (FlexAttention with a ``mask_mod`` and no ``score_mod``); the
block mask records which ``block_size x block_size`` tiles hold any allowed pair, so that a fused
kernel skips the empty tiles and never materializes the ``N x M`` scores. Used by
``neighborhood_attention(impl="flex")`` and ``sliding_window_attention(impl="flex")``, which pass
their own ``mask_mod`` (the exact mask rule of their reference).

:func:`flex_masked_attention` is the one entry point:

- ``torch.nn.attention.flex_attention.flex_attention`` runs through ``torch.compile`` (wrapped
  lazily, once per process, on the first call). On CUDA with PyTorch's default ``dynamic=None``: a
  second length recompiles once with a symbolic length and later lengths reuse it. On CPU with
  ``dynamic=False`` (one static graph per shape and mask parameters), because torch 2.13's CPU
  template fails to build its C++ under dynamic shapes with a 2-D NATTEN mask (``CppCompileError:
  'cur_kvSplitSize9' was not declared``, met when a second length recompiled dynamically). Each
  distinct mask function (and dtype, head dim, GQA setting, grad mode) is one more compiled graph;
  the dynamo recompile limit is raised to :data:`RECOMPILE_LIMIT` around this call only, so that
  several ops and shapes in one process do not silently fall back to the unfused eager path.
- Compiler boundary: block-mask lookup/building (:func:`flex_block_mask`, Python-side caching) is
  wrapped in ``torch.compiler.disable``. Inside a user's ``torch.compile`` region the op graph-breaks
  at that lookup (dynamo splits each enclosing frame there), then calls ``flex_attention`` directly, so
  that the FlexAttention operator is traced into the user's graph (no nested compile, no eager
  fallback). ``fullgraph=True`` user compiles are not supported (the break).
- Block masks come from ``create_block_mask`` and are kept in an LRU cache (:data:`CACHE_SIZE`
  entries) keyed by ``(mask_key, N, M, device, block_size)``; ``mask_key`` is the hashable parameter
  tuple of the mask (the caller's promise that equal keys mean equal masks). Long sequences are built
  in chunks of query rows (:data:`MASK_CHUNK_ELEMENTS` mask entries per chunk), because eager
  ``create_block_mask`` evaluates the ``mask_mod`` densely (``N x M`` int64 intermediates: 32 GiB
  each at N = 65536); the chunks are concatenated into one ``BlockMask`` (``BlockMask.from_kv_blocks``).
- GQA: ``enable_gqa`` when ``k, v`` have fewer heads than ``q`` (query head ``h`` uses key head
  ``h // (H / H_kv)``, as ``expand_kv``). Output in the dtype of ``q`` (the fused kernels accumulate
  in float32).

What torch 2.13.0+cpu's compiled FlexAttention supports on CPU (measured on this project's build
machine, an x86 CPU with AVX2; the C++ template needs AVX2):

- forward: yes, float32, bfloat16 and float16; every length tried (1, 2, 13, 60, 200, 300, 1024, 4096,
  8192: lengths below or not a multiple of the 128 block are fine); head dims 7, 8, 16, 64, 100, 128,
  a value dim other than the head dim (8 / 5), GQA;
- backward: no. Inductor's CPU template is inference only and eager ``flex_attention`` refuses a
  backward on CPU too; this module raises ``NotImplementedError`` on CPU when a gradient is needed
  (use ``impl="gather"``, which "auto" picks on CPU).
- float64: not compiled on CPU (the CPU template raises for it). float64 (the checking dtype) is run
  by ``flex_attention`` eagerly on every device: same math, unfused, ``O(N M)`` memory, and on CPU
  still no backward. It exists so that the conformance suite can hold ``impl="flex"`` to the
  float64 reference; do not use it for long sequences.
- first compile takes several seconds on CPU (4-25 s on the shared 2-core machine), each recompile
  a few seconds.

On CUDA the compiled path (forward and backward, Triton kernels) is what ``impl="auto"`` of the
local ops selects.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = [
    "flex_masked_attention",
    "flex_block_mask",
    "auto_uses_flex",
    "flex_cache_info",
    "clear_flex_cache",
    "FlexCacheInfo",
    "CACHE_SIZE",
    "MASK_CHUNK_ELEMENTS",
    "RECOMPILE_LIMIT",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CACHE_SIZE = 32
"""Block masks kept (LRU); one per (mask parameters, N, M, device, block size)."""

MASK_CHUNK_ELEMENTS = 1 << 25
"""Mask entries evaluated per ``create_block_mask`` call when building a block mask (rows chunked)."""

RECOMPILE_LIMIT = 64
"""Dynamo recompile limit applied around the compiled call (PyTorch's default is 8)."""

COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FlexCacheInfo(NamedTuple):
    """Block-mask cache counters: ``builds`` (misses) and ``hits`` since the last clear, and ``size``."""

    hits: int
    builds: int
    size: int


_cache: OrderedDict[tuple, BlockMask] = OrderedDict()
_counts = {"hits": 0, "builds": 0}
_lock = threading.Lock()
_compiled: dict[bool, Callable[..., torch.Tensor]] = {}


def auto_uses_flex(q: torch.Tensor) -> bool:
    """What ``impl="auto"`` of the local ops decides: compiled flex on CUDA in float32/bfloat16/float16.

    Elsewhere they use "gather": on CPU compiled FlexAttention has no backward (and costs seconds of
    compilation per shape family), and float64 has no compiled CPU kernel (it is the checking dtype).
    """
    return q.device.type == "cuda" and q.dtype in COMPILED_DTYPES


def flex_cache_info() -> FlexCacheInfo:
    """Counters of the block-mask cache (a hit is a call that built nothing)."""
    with _lock:
        return FlexCacheInfo(_counts["hits"], _counts["builds"], len(_cache))


def clear_flex_cache() -> None:
    """Empty the block-mask cache and reset its counters (the compiled function is kept)."""
    with _lock:
        _cache.clear()
        _counts.update(hits=0, builds=0)


def _build_block_mask(mask_mod: MaskMod, N: int, M: int, device: torch.device, block_size: int) -> BlockMask:
    """``create_block_mask`` over chunks of query rows, concatenated (bounded memory for long N)."""
    rows = max(block_size, MASK_CHUNK_ELEMENTS // max(M, 1) // block_size * block_size)
    if rows >= N:
        return create_block_mask(mask_mod, None, None, N, M, device=device, BLOCK_SIZE=block_size)
    parts = []
    for start in range(0, N, rows):
        def shifted(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor,
                    start: int = start) -> torch.Tensor:
            return mask_mod(b, h, q_idx + start, kv_idx)

        parts.append(create_block_mask(shifted, None, None, min(rows, N - start), M, device=device,
                                       BLOCK_SIZE=block_size))
    # kv_num_blocks [1, 1, Qb]; kv_indices [1, 1, Qb, KVb] (KVb is the same for every chunk)
    kv_num_blocks = torch.cat([p.kv_num_blocks for p in parts], dim=-1)
    kv_indices = torch.cat([p.kv_indices for p in parts], dim=-2)
    full_num = full_indices = None
    if parts[0].full_kv_num_blocks is not None:
        full_num = torch.cat([p.full_kv_num_blocks for p in parts], dim=-1)
        full_indices = torch.cat([p.full_kv_indices for p in parts], dim=-2)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_num, full_indices,
                                    BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod, seq_lengths=(N, M))


@torch.compiler.disable
def flex_block_mask(mask_mod: MaskMod, *, mask_key: Hashable, length: int, key_length: int,
                    device: torch.device, block_size: int = 128) -> BlockMask:
    """The cached ``BlockMask`` of ``mask_mod`` for ``length`` queries and ``key_length`` keys.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend), FlexAttention's form.
        mask_key: hashable parameters of the mask; equal keys must mean equal masks (``mask_mod`` is
            only called on a miss).
        length, key_length: N and M.
        device: where the mask (and the attention) lives.
        block_size: the sparse block size (FlexAttention's default 128).
    """
    key = (mask_key, length, key_length, str(torch.device(device)), block_size)
    with _lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            _counts["hits"] += 1
            return found
    block_mask = _build_block_mask(mask_mod, length, key_length, torch.device(device), block_size)
    with _lock:
        _counts["builds"] += 1
        _cache[key] = block_mask
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return block_mask


def _flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float,
               enable_gqa: bool) -> torch.Tensor:
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _flex_call_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float,
                      enable_gqa: bool) -> torch.Tensor:
    # a separate code object: dynamo keeps its compiled graphs apart from the dynamic one's
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _compiled_flex(device: torch.device) -> Callable[..., torch.Tensor]:
    """The compiled call for ``device``: static shapes on CPU, PyTorch's default elsewhere."""
    static = device.type == "cpu"
    if static not in _compiled:
        _compiled[static] = (torch.compile(_flex_call_static, dynamic=False) if static
                             else torch.compile(_flex_call))
    return _compiled[static]


def flex_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask_mod: MaskMod,
                          mask_key: Hashable, scale: float, block_size: int = 128) -> torch.Tensor:
    """``softmax(scale Q K^T + log(mask)) V`` by compiled FlexAttention with a cached block mask.

    FlexAttention (arXiv 2412.05496) with a mask_mod. Inputs are assumed checked by the caller
    (``check_qkv``, ``check_scale``); every query row must have at least one allowed key.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]`` (``H_kv`` divides ``H``).
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` on flat positions (True = attend).
        mask_key: hashable parameters of the mask (the block-mask cache key, with N, M, device).
        scale: multiplies ``q . k``.
        block_size: sparse block size of the block mask.

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q.

    Raises:
        NotImplementedError: on CPU when a gradient is needed (no FlexAttention backward on CPU).
    """
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if needs_grad and q.device.type == "cpu":
        raise NotImplementedError(
            "FlexAttention has no backward on CPU (torch.compile's CPU template is inference only, and "
            "eager flex_attention refuses it); use impl='gather' (what 'auto' picks on CPU) when a "
            "gradient is needed"
        )
    if q.device.type == "cpu":  # flex_attention refuses inputs that require grad on CPU, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = flex_block_mask(mask_mod, mask_key=mask_key, length=q.shape[2], key_length=k.shape[2],
                                 device=q.device, block_size=block_size)
    enable_gqa = k.shape[1] != q.shape[1]
    if torch.compiler.is_compiling():  # inside the user's torch.compile: trace into their graph
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if q.dtype not in COMPILED_DTYPES:  # float64: no compiled CPU kernel; the eager (unfused) form
        return _eager_flex(q, k, v, block_mask, scale, enable_gqa)
    with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
        return _compiled_flex(q.device)(q, k, v, block_mask, scale, enable_gqa)


def _eager_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float,
                enable_gqa: bool) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out: Any = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    return out
