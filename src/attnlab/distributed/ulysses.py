"""The Ulysses strategy: all-to-all from sequence shards to head shards, any op on the whole sequence, and back.

"DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence Transformer
Models" (Jacobs et al., arXiv 2309.14509): rank ``j`` receives heads ``[j H / W, (j + 1) H / W)`` of every
rank's shard (and the matching key/value heads), so it holds the whole sequence for its heads; any op
whose heads are independent then runs unchanged; a second all-to-all returns each rank's shard of the
output for all heads. The heads ``H`` and the key/value heads ``H_kv`` must be multiples of ``W``.
Per-head tensor options (lightning's ``decay [H]``) are sliced to the rank's heads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attnlab.distributed.comm import all_to_all, group_rank
from attnlab.distributed.sharding import SequenceLayout
from attnlab.registry import get

__all__ = ["PER_HEAD_OPTIONS", "ulysses_attention"]

PER_HEAD_OPTIONS = ("decay",)


def _whole_sequence(pieces: list[torch.Tensor], layout: SequenceLayout) -> torch.Tensor:
    """Rank-ordered shards ``[B, h, n, X]`` -> the sequence in global order ``[B, h, W n, X]``."""
    cpr = layout.chunks_per_rank
    chunks: list[torch.Tensor | None] = [None] * layout.num_chunks
    for rank, piece in enumerate(pieces):
        for position, chunk in enumerate(layout.chunks(rank)):
            chunks[chunk] = piece.chunk(cpr, dim=2)[position]
    return torch.cat(chunks, dim=2)  # type: ignore[arg-type]


def _shards(whole: torch.Tensor, layout: SequenceLayout) -> list[torch.Tensor]:
    """The inverse of :func:`_whole_sequence`: each rank's shard, in rank order."""
    chunks = whole.chunk(layout.num_chunks, dim=2)
    return [torch.cat([chunks[c] for c in layout.chunks(rank)], dim=2) for rank in range(layout.world)]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mechanism: str,
                      group: dist.ProcessGroup | None, layout: SequenceLayout, causal: bool, length: int,
                      options: dict[str, Any]) -> torch.Tensor:
    """Any registered op on this rank's shard through two all-to-alls (see the module docstring).

    Inputs validated by :func:`context_parallel_attention` (heads divisible by ``W``).

    Returns:
        ``[B, H, n, Dv]`` in q's dtype.
    """
    W = layout.world
    rank = group_rank(group)
    B, H, n, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    h, hkv = H // W, Hkv // W
    # one all-to-all: piece j holds heads of group j of q, k and v, flattened
    outgoing = [torch.cat([q[:, j * h:(j + 1) * h].reshape(-1), k[:, j * hkv:(j + 1) * hkv].reshape(-1),
                           v[:, j * hkv:(j + 1) * hkv].reshape(-1)]) for j in range(W)]
    incoming = all_to_all(outgoing, group=group)
    sizes = [B * h * n * D, B * hkv * n * D, B * hkv * n * Dv]
    qs, ks, vs = [], [], []
    for piece in incoming:
        a, b, c = piece.split(sizes)
        qs.append(a.view(B, h, n, D))
        ks.append(b.view(B, hkv, n, D))
        vs.append(c.view(B, hkv, n, Dv))
    qw, kw, vw = (_whole_sequence(x, layout)[:, :, :length] for x in (qs, ks, vs))  # (B, h|hkv, N, D|Dv)
    local_options = dict(options)
    for name in PER_HEAD_OPTIONS:
        value = local_options.get(name)
        if isinstance(value, torch.Tensor) and value.ndim == 1:
            local_options[name] = value[rank * h:(rank + 1) * h]
    out = get(mechanism)(qw, kw, vw, causal=causal, **local_options)  # (B, h, N, Dv)
    padding = W * n - length
    if padding:
        out = torch.cat([out, out.new_zeros(B, h, padding, Dv)], dim=2)
    back = all_to_all([s.reshape(-1) for s in _shards(out, layout)], group=group)  # from each head group
    return torch.cat([piece.view(B, h, n, Dv) for piece in back], dim=1)  # (B, H, n, Dv)
