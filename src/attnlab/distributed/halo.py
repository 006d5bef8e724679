"""The halo strategy for local windows: each chunk borrows the boundary keys of its neighbouring chunks.

A query of sliding-window attention (Longformer, arXiv 2004.05150, sec. 3.1) or of 1-D neighborhood
attention (NATTEN, arXiv 2204.07143 / 2504.16922) reads keys at most ``L`` positions before it and ``R``
after it. With chunks of at least ``max(L, R)`` tokens, chunk ``c`` needs only the last ``L`` keys of
chunk ``c - 1`` and the first ``R`` of chunk ``c + 1``: one point-to-point exchange with the neighbouring
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
from attnlab.ops.neighborhood import _Grid
from attnlab.ops.sliding_window import _band, _check_window, gathered_block_attention
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
def _neighborhood_reach(length: int, kernel: tuple, stride: tuple, dilation: tuple, causal: tuple) -> tuple[int, int]:
    grid = _Grid((length,), kernel, stride, dilation, causal)
    queries = torch.arange(length)
    keys, valid = grid.neighbours(queries)  # (N, K)
    before = torch.where(valid, queries[:, None] - keys, torch.zeros_like(keys)).amax()
    after = torch.where(valid, keys - queries[:, None], torch.zeros_like(keys)).amax()
    return int(before), int(after)


def halo_reach(mechanism: str, *, length: int, causal: bool, options: dict[str, Any]) -> tuple[int, int]:
    """``(L, R)``: how many positions before and after itself any query of the whole sequence reads."""
    if mechanism == "sliding_window":
        window = _check_window(options.get("window"))
        return (window - 1, 0) if causal else (window // 2, window // 2)
    grid = _neighborhood_grid(length, options, causal)
    return _neighborhood_reach(length, grid.kernel, grid.stride, grid.dilation, grid.causal)


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
    [G, S]`` and ``allowed [G, Bq, S]`` (the mask rule on global positions). Cached: every layer and
    step of a model reuses them."""
    device = torch.device(device_name)
    rule = _rule(mechanism, length, causal, dict(mask_options))
    Bq = max(1, min(size, 64))
    G = -(-size // Bq)
    S = Bq + before + after
    extended = before + size + after
    first = chunk * size - before  # global position of extended key 0
    index = (torch.arange(G, device=device) * Bq)[:, None] + torch.arange(S, device=device)  # (G, S)
    key_pos = first + index
    query_pos = chunk * size + (torch.arange(G, device=device) * Bq)[:, None] + torch.arange(Bq, device=device)
    inside = (index < extended) & (key_pos >= 0) & (key_pos < length)  # (G, S)
    allowed = rule(query_pos[:, :, None], key_pos[:, None, :]) & inside[:, None, :]  # (G, Bq, S)
    allowed &= (query_pos < min(length, (chunk + 1) * size))[:, :, None]
    return index.clamp(max=extended - 1), allowed


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
    before, after = halo_reach(mechanism, length=length, causal=causal, options=options)
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
