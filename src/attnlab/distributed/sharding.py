"""How a sequence is split over the ranks of a group: layouts, :func:`shard_sequence`, :func:`gather_sequence`.

The sequence of ``N`` tokens is cut into equal chunks; each rank holds some of them, concatenated in
ascending order:

- ``"contiguous"``: ``W`` chunks, rank ``r`` holds chunk ``r`` (consecutive pieces in rank order);
- ``"zigzag"``: ``2 W`` chunks, rank ``r`` holds chunks ``r`` and ``2 W - 1 - r``. Under causal
  attention chunk ``c`` costs about ``c + 1/2`` blocks of work, so every rank gets the same total
  (the load balancing of ring attention with causal masks, as in Llama 3's context parallelism,
  "The Llama 3 Herd of Models", arXiv 2407.21783, sec. 3.3.2).

A length that the chunks do not divide is padded at the END of the sequence (``shard_sequence(...,
pad=True)``) and the strategies are told the real length (``length=``): padded keys are masked out,
padded queries return zeros, and recurrent states count real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from attnlab.distributed.comm import all_gather_stacked, group_rank, group_size

__all__ = ["LAYOUTS", "SequenceLayout", "sequence_layout", "shard_sequence", "gather_sequence", "shard_positions"]

LAYOUTS = ("contiguous", "zigzag")
Layout = Literal["contiguous", "zigzag"]


@dataclass(frozen=True)
class SequenceLayout:
    """Which chunks of the sequence each rank holds.

    Attributes:
        name: "contiguous" or "zigzag".
        world: ranks in the group.
        chunks_per_rank: 1 (contiguous) or 2 (zigzag).
    """

    name: str
    world: int

    @property
    def chunks_per_rank(self) -> int:
        return 2 if self.name == "zigzag" else 1

    @property
    def num_chunks(self) -> int:
        return self.world * self.chunks_per_rank

    def chunks(self, rank: int) -> tuple[int, ...]:
        """Global chunk ids held by ``rank``, in the order they sit in its local shard."""
        if self.name == "zigzag":
            return (rank, 2 * self.world - 1 - rank)
        return (rank,)

    def owner(self, chunk: int) -> tuple[int, int]:
        """``(rank, position in that rank's shard)`` of global chunk ``chunk``."""
        if self.name == "zigzag":
            return (chunk, 0) if chunk < self.world else (2 * self.world - 1 - chunk, 1)
        return chunk, 0

    def positions(self, rank: int, local_length: int, device: torch.device | None = None) -> torch.Tensor:
        """Global positions ``[n]`` (int64) of the ``n = local_length`` tokens held by ``rank``."""
        size = local_length // self.chunks_per_rank
        return torch.cat([chunk * size + torch.arange(size, device=device) for chunk in self.chunks(rank)])


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
    return str(layout)


def sequence_layout(layout: Layout, *, group: dist.ProcessGroup | None = None) -> SequenceLayout:
    """The :class:`SequenceLayout` ``layout`` over ``group`` (default: the whole world)."""
    return SequenceLayout(check_layout(layout), group_size(group))


def _check_dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim={dim!r} is not a dimension of x with shape {tuple(x.shape)}")
    return dim % x.ndim


def shard_sequence(x: torch.Tensor, *, group: dist.ProcessGroup | None = None, layout: Layout = "contiguous",
                   dim: int = 2, pad: bool = False) -> torch.Tensor:
    """This rank's shard of the whole sequence ``x`` (the same tensor on every rank); no communication.

    Args:
        x: the whole sequence, e.g. ``[B, H, N, D]`` (``dim=2``) or tokens ``[B, N]`` (``dim=1``).
        group: the ranks that split the sequence (default: the whole world).
        layout: "contiguous" (rank ``r`` holds tokens ``[r n, (r + 1) n)``) or "zigzag" (rank ``r``
            holds chunks ``r`` and ``2W - 1 - r`` of ``2W``).
        dim: the sequence dimension.
        pad: when ``N`` is not a multiple of the chunk count (``W``, or ``2W`` for zigzag), append zeros
            at the end up to the next multiple (pass ``length=N`` to :func:`context_parallel_attention`
            and :func:`gather_sequence`); ``False`` raises instead.

    Returns:
        ``x`` with ``n = ceil(N / chunks) * chunks_per_rank`` tokens along ``dim``.
    """
    dim = _check_dim(x, dim)
    spec = sequence_layout(layout, group=group)
    N = x.shape[dim]
    chunks = spec.num_chunks
    if N % chunks:
        if not pad:
            raise ValueError(
                f"the sequence length N={N} is not a multiple of the {chunks} chunks of layout={spec.name!r} over "
                f"{spec.world} ranks; pass pad=True (zeros appended at the end, then length={N} to "
                f"context_parallel_attention and gather_sequence) or use a length divisible by {chunks}"
            )
        extra = chunks - N % chunks
        shape = list(x.shape)
        shape[dim] = extra
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    pieces = x.chunk(chunks, dim=dim)
    return torch.cat([pieces[c] for c in spec.chunks(group_rank(group))], dim=dim)


def gather_sequence(x: torch.Tensor, *, group: dist.ProcessGroup | None = None, layout: Layout = "contiguous",
                    dim: int = 2, length: int | None = None) -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` (the inverse of :func:`shard_sequence`).

    Differentiable: the backward pass sums, over ranks, the gradients that reach each rank's copy of
    the whole sequence (a reduce-scatter), so a loss computed on every rank's copy counts once per rank.

    Args:
        x: this rank's shard (every rank's has the same shape).
        length: the real length to keep (drops the padding of ``shard_sequence(..., pad=True)``).
    """
    dim = _check_dim(x, dim)
    spec = sequence_layout(layout, group=group)
    n = x.shape[dim]
    if n % spec.chunks_per_rank:
        raise ValueError(f"a zigzag shard holds two equal chunks: its length {n} along dim={dim} must be even")
    stacked = all_gather_stacked(x, group=group)  # (W, *x.shape)
    pieces: list[torch.Tensor | None] = [None] * spec.num_chunks
    for rank in range(spec.world):
        for position, piece in enumerate(stacked[rank].chunk(spec.chunks_per_rank, dim=dim)):
            pieces[spec.chunks(rank)[position]] = piece
    whole = torch.cat(pieces, dim=dim)  # type: ignore[arg-type]
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= whole.shape[dim]:
            raise ValueError(f"length={length!r} must be an int in [1, {whole.shape[dim]}]")
        whole = whole.narrow(dim, 0, length)
    return whole


def shard_positions(local_length: int, *, group: dist.ProcessGroup | None = None, layout: Layout = "contiguous",
                    device: torch.device | None = None) -> torch.Tensor:
    """Global positions ``[n]`` (int64) of the ``n = local_length`` tokens this rank holds (for position
    embeddings of a sharded model)."""
    spec = sequence_layout(layout, group=group)
    if local_length % spec.chunks_per_rank:
        raise ValueError(f"a zigzag shard holds two equal chunks: local_length={local_length} must be even")
    return spec.positions(group_rank(group), local_length, device)
