"""The halo strategy for local windows: each chunk borrows the boundary keys of its neighbouring chunks.

The queries of a chunk of sliding-window attention (Longformer, arXiv 2004.05150, sec. 3.1) or of 1-D
neighborhood attention (NATTEN, arXiv 2204.07143 / 2504.16922) read keys at most ``L`` positions before
the chunk and ``R`` after it. With chunks of at least ``max(L, R)`` tokens, chunk ``c`` needs only the last
``L`` keys of chunk ``c - 1`` and the first ``R`` of chunk ``c + 1``: one point-to-point exchange with the neighbouring
ranks, ``(L + R)`` keys and values per chunk whatever the sequence length. Each chunk then runs the
gathered block attention of :mod:`attnlab.ops.sliding_window` on ``[left halo, chunk, right halo]``
with the mask rule evaluated on global positions (so the neighbourhood's inward shift at the borders of
the whole sequence is kept).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from attnlab.distributed.comm import Message, anchor, exchange, group_rank
from attnlab.distributed.sharding import SequenceLayout
from attnlab.ops.gathered_blocks import gathered_block_attention
from attnlab.ops.neighborhood import _Grid
from attnlab.ops.sliding_window import _band, _check_window
from attnlab.ops.validation import check_scale

__all__ = ["HALO_MECHANISMS", "halo_reach", "halo_attention"]

HALO_MECHANISMS = ("sliding_window", "neighborhood")

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _neighborhood_grid(length: int, options: dict[str, Any], causal: bool) -> _Grid:
    shape = options.get("shape")
    if shape is not None and (not isinstance(shape, int) and len(tuple(shape)) != 1):
        raise ValueError(f"strategy='halo' serves the 1-D neighbourhood only, got shape={shape!r}; for 2-D/3-D "
                         f"grids use strategy='ulysses'")
    return _Grid((length,), options["kernel_size"], options.get("stride", 1), options.get("dilation", 1), causal)


@functools.lru_cache(maxsize=32)
def _neighborhood_extent(length: int, kernel: tuple, stride: tuple, dilation: tuple, causal: tuple
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    grid = _Grid((length,), kernel, stride, dilation, causal)
    keys, valid = grid.neighbours(torch.arange(length))  # (N, K)
    return torch.where(valid, keys, length).amin(1), torch.where(valid, keys, -1).amax(1)


def _extent(mechanism: str, length: int, causal: bool, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last key position ``[N]`` (int64) each query of the whole sequence reads."""
    if mechanism == "sliding_window":
        window = _check_window(options.get("window"))
        before, after = (window - 1, 0) if causal else (window // 2, window // 2)
        queries = torch.arange(length)
        return (queries - before).clamp_min(0), (queries + after).clamp_max(length - 1)
    grid = _neighborhood_grid(length, options, causal)
    return _neighborhood_extent(length, grid.kernel, grid.stride, grid.dilation, grid.causal)


def halo_reach(mechanism: str, *, length: int, causal: bool, options: dict[str, Any], chunk: int) -> tuple[int, int]:
    """``(L, R)``: the keys any chunk of ``chunk`` tokens reads before its first and after its last token.

    Sliding window: ``(window - 1, 0)`` causal, ``(window // 2, window // 2)`` otherwise. The neighbourhood
    reads further only near the ends of the whole sequence (NATTEN's inward shift), where there is no
    neighbouring chunk, so its halo is about ``kernel_size // 2`` times the dilation.
    """
    first, last = _extent(mechanism, length, causal, options)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    first = torch.cat([first, first.new_full((pad,), length)]).view(chunks, chunk).amin(1)  # (C,)
    last = torch.cat([last, last.new_full((pad,), -1)]).view(chunks, chunk).amax(1)
    starts = torch.arange(chunks) * chunk
    before = int((starts - first).clamp_min(0).max())
    after = int((last - (starts + chunk - 1)).clamp_min(0).max())
    return before, after


def _rule(mechanism: str, length: int, causal: bool, options: dict[str, Any]) -> Rule:
    if mechanism == "sliding_window":
        window = _check_window(options.get("window"))
        return lambda i, j: _band(i, j, window, causal)
    grid = _neighborhood_grid(length, options, causal)
    return lambda i, j: grid.allowed(i.clamp(0, length - 1), j.clamp(0, length - 1))


MASK_OPTIONS = ("window", "kernel_size", "stride", "dilation", "shape")


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


@functools.lru_cache(maxsize=64)
def _chunk_blocks(mechanism: str, length: int, causal: bool, mask_options: tuple, chunk: int, size: int,
                  before: int, after: int, device_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Query blocks of ``chunk`` over its extended keys ``[before halo, chunk, after halo]``: ``key_index
    [G, S]`` (each block's span of keys, from the first to the last key its queries read) and ``allowed
    [G, Bq, S]`` (the mask rule on global positions). Cached: every layer and step reuses them."""
    device = torch.device(device_name)
    options = dict(mask_options)
    rule = _rule(mechanism, length, causal, options)
    first, last = _extent(mechanism, length, causal, options)
    Bq = max(1, min(size, max(32, min(128, before + after + 1))))
    G = -(-size // Bq)
    extended = before + size + after
    start = chunk * size - before  # global position of extended key 0
    query_pos = chunk * size + torch.arange(G * Bq).view(G, Bq)  # (G, Bq)
    clamped = query_pos.clamp(max=length - 1)
    low, high = first[clamped].amin(1), last[clamped].amax(1)  # (G,): the span each block reads
    S = max(1, int((high - low + 1).max()))
    key_pos = low[:, None] + torch.arange(S)  # (G, S)
    index = key_pos - start
    inside = (index >= 0) & (index < extended) & (key_pos >= 0) & (key_pos < length)  # (G, S)
    allowed = rule(query_pos[:, :, None], key_pos[:, None, :]) & inside[:, None, :]  # (G, Bq, S)
    allowed &= (query_pos < min(length, (chunk + 1) * size))[:, :, None]
    return index.clamp(0, extended - 1).to(device), allowed.to(device)


def _messages(layout: SequenceLayout, size: int, before: int, after: int) -> list[Message]:
    """Every chunk sends its last ``before`` keys to the next chunk and its first ``after`` to the previous."""
    messages = []
    for chunk in range(layout.num_chunks):
        rank, position = layout.owner(chunk)
        start = position * size
        if before and chunk + 1 < layout.num_chunks:
            target, _ = layout.owner(chunk + 1)
            messages.append(Message(rank, target, (chunk + 1, 0), start + size - before, start + size))
        if after and chunk > 0:
            target, _ = layout.owner(chunk - 1)
            messages.append(Message(rank, target, (chunk - 1, 1), start, start + after))
    return messages


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mechanism: str,
                   group: dist.ProcessGroup | None, layout: SequenceLayout, causal: bool, length: int,
                   options: dict[str, Any]) -> torch.Tensor:
    """Sliding-window or 1-D neighborhood attention of this rank's shard, with halos from the neighbours.

    Inputs validated by :func:`context_parallel_attention` (which checks the reach against the chunk).

    Returns:
        ``[B, H, n, Dv]`` in q's dtype.
    """
    B, H, n, D = q.shape
    Dv = v.shape[-1]
    rank = group_rank(group)
    size = n // layout.chunks_per_rank
    before, after = halo_reach(mechanism, length=length, causal=causal, options=options, chunk=size)
    scale = check_scale(options.get("scale"), D)
    kv = torch.cat([k, v], dim=-1)  # (B, H_kv, n, D + Dv): one message per halo
    messages = _messages(layout, size, before, after)
    received, token = exchange(messages, kv, group=group)
    incoming = {m.key: t for m, t in zip([m for m in messages if m.target == rank], received, strict=True)}
    mask_options = tuple(sorted((name, _hashable(value)) for name, value in options.items() if name in MASK_OPTIONS))
    outputs = []
    for position, chunk in enumerate(layout.chunks(rank)):
        rows = slice(position * size, (position + 1) * size)
        pieces = []
        if before:
            left = incoming.get((chunk, 0))
            pieces.append(left if left is not None else kv.new_zeros(B, kv.shape[1], before, D + Dv))
        pieces.append(kv[:, :, rows])
        if after:
            right = incoming.get((chunk, 1))
            pieces.append(right if right is not None else kv.new_zeros(B, kv.shape[1], after, D + Dv))
        extended = torch.cat(pieces, dim=2)  # (B, H_kv, before + size + after, D + Dv)
        key_index, allowed = _chunk_blocks(mechanism, length, causal, mask_options, chunk, size, before, after,
                                           str(q.device))
        outputs.append(gathered_block_attention(q[:, :, rows], extended[..., :D], extended[..., D:],
                                                key_index=key_index, allowed=allowed, scale=scale))
    return anchor(torch.cat(outputs, dim=2), token, *received)
