"""Collectives whose backward runs the matching collective, and a count of the bytes each rank sends.

Every context-parallel strategy moves tensors between ranks and needs the gradient to travel back along
the same path: an all-gather in the forward pass is a reduce-scatter (sum) in the backward pass, an
all-to-all is the reverse all-to-all, a point-to-point exchange is the same exchange with senders and
receivers swapped. Each is one ``torch.autograd.Function`` so that one call of a strategy adds one
collective node to the graph, and every rank, whose graph has the same structure, runs the backward
collectives in the same order. :func:`anchor` ties a collective's output to the strategy's result even
on a rank whose result does not read it (rank 0 of a causal prefix reads no earlier state), so the
backward collective is entered on every rank and no rank waits for a peer that never comes.

:func:`traffic` counts the payload bytes this rank hands to ``torch.distributed`` (the benchmark compares
them with the formulas of each strategy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "Traffic",
    "traffic",
    "group_size",
    "group_rank",
    "all_gather_stacked",
    "all_to_all",
    "exchange",
    "anchor",
    "Message",
]


@dataclass
class Traffic:
    """Payload bytes this rank sent, by kind of collective (forward and backward together)."""

    bytes_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_kind.values())

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + int(nbytes)


_COUNTERS: list[Traffic] = []


@contextlib.contextmanager
def traffic() -> Iterator[Traffic]:
    """Count the bytes this rank sends inside the ``with`` block (forward and backward collectives).

    All-gather: the local tensor to each of the other ``W - 1`` ranks; reduce-scatter and all-to-all:
    the ``(W - 1) / W`` of the buffer meant for other ranks; point-to-point: the tensor sent.
    """
    counter = Traffic()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count(kind: str, nbytes: int) -> None:
    for counter in _COUNTERS:
        counter.add(kind, nbytes)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


# ----------------------------------------------------------------------------------------------------
# all-gather (backward: reduce-scatter)

# PyTorch 2.13 renamed the tensor forms (the old names warn); older releases have only the old names
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        world = group_size(group)
        ctx.shape = x.shape
        flat = x.contiguous().reshape(-1)
        out = flat.new_empty(world * flat.numel())  # gloo takes the concatenated (flat) form
        _ALL_GATHER(out, flat, group=group)
        _count("all_gather", (world - 1) * _nbytes(flat))
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        group = ctx.group
        world = group_size(group)
        flat = grad.contiguous().reshape(-1)
        out = flat.new_empty(flat.numel() // world)
        # every rank's loss read every rank's piece: my piece's gradient is the sum over ranks
        _REDUCE_SCATTER(out, flat, op=dist.ReduceOp.SUM, group=group)
        _count("reduce_scatter", (world - 1) * _nbytes(out))
        return out.view(ctx.shape), None


def all_gather_stacked(x: torch.Tensor, *, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``x`` of every rank stacked in rank order, ``[W, *x.shape]``; differentiable (backward: reduce-scatter).

    Every rank must call it with the same shape and dtype.
    """
    return _AllGather.apply(x, group)


# ----------------------------------------------------------------------------------------------------
# all-to-all (backward: the reverse all-to-all)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, group: dist.ProcessGroup | None,
                *pieces: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        return tuple(_all_to_all(list(pieces), group))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple[None | torch.Tensor, ...]:
        # piece j went to rank j and came back as received piece j there: the reverse all-to-all
        return (None, *_all_to_all(list(grads), ctx.group))


def _all_to_all(pieces: list[torch.Tensor], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    rank = group_rank(group)
    pieces = [p.contiguous() for p in pieces]
    received = [torch.empty_like(p) for p in pieces]
    dist.all_to_all(received, pieces, group=group)
    _count("all_to_all", sum(_nbytes(p) for j, p in enumerate(pieces) if j != rank))
    return received


def all_to_all(pieces: Sequence[torch.Tensor], *, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Send ``pieces[j]`` to rank ``j``; return what each rank sent to this one, in rank order.

    Every rank's piece ``j`` must have the shape of rank ``j``'s piece for this rank (equal shapes
    everywhere in practice). Differentiable: the backward pass is the reverse all-to-all.
    """
    return list(_AllToAll.apply(group, *pieces))


# ----------------------------------------------------------------------------------------------------
# point-to-point exchange (backward: the same messages, senders and receivers swapped)


@dataclass(frozen=True)
class Message:
    """The slice ``x[:, :, start:stop]`` of rank ``source``'s local tensor, sent to rank ``target``.

    ``key`` orders the messages between a pair of ranks: both sides post them sorted by key, so
    several messages between the same two ranks are matched in the same order on both sides.
    """

    source: int
    target: int
    key: tuple[int, ...]
    start: int
    stop: int


def _p2p(sends: list[tuple[Message, torch.Tensor]], receives: list[tuple[Message, torch.Tensor]],
         group: dist.ProcessGroup | None, *, reverse: bool = False) -> None:
    """Post every send and receive (sorted by key on both sides), then wait for all of them.

    ``reverse``: the messages travel back (the backward pass), from ``target`` to ``source``.
    """
    operations = []
    for message, tensor in sorted(sends, key=lambda item: item[0].key):
        peer = message.source if reverse else message.target
        operations.append(dist.P2POp(dist.isend, tensor.contiguous(), group=group, group_peer=peer))
        _count("p2p", _nbytes(tensor))
    for message, tensor in sorted(receives, key=lambda item: item[0].key):
        peer = message.target if reverse else message.source
        operations.append(dist.P2POp(dist.irecv, tensor, group=group, group_peer=peer))
    if operations:
        for request in dist.batch_isend_irecv(operations):
            request.wait()


def _received_shape(x: torch.Tensor, message: Message) -> tuple[int, ...]:
    return (*x.shape[:2], message.stop - message.start, *x.shape[3:])


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, group: dist.ProcessGroup | None,
                messages: tuple[Message, ...]) -> tuple[torch.Tensor, ...]:
        rank = group_rank(group)
        ctx.group, ctx.messages = group, messages
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        mine_out = [m for m in messages if m.source == rank]
        mine_in = [m for m in messages if m.target == rank]
        incoming = [x.new_empty(_received_shape(x, m)) for m in mine_in]
        sends = [(m, x[:, :, m.start:m.stop]) for m in mine_out if m.target != rank]
        receives = [(m, t) for m, t in zip(mine_in, incoming, strict=True) if m.source != rank]
        _p2p(sends, receives, group)
        for i, m in enumerate(mine_in):  # messages to oneself are copies
            if m.source == rank:
                incoming[i] = x[:, :, m.start:m.stop].clone()
        # a rank that receives nothing still gets an output (a token to anchor), so its backward runs
        return (x.new_zeros(()), *incoming)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, _token_grad: torch.Tensor,
                 *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        group, messages = ctx.group, ctx.messages
        rank = group_rank(group)
        mine_out = [m for m in messages if m.source == rank]
        mine_in = [m for m in messages if m.target == rank]
        grad_x = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        back = [grad_x.new_empty(_received_shape(grad_x, m)) for m in mine_out]
        # the gradient of a received slice goes back to its sender, who adds it where the slice came from
        sends = [(m, g) for m, g in zip(mine_in, grads, strict=True) if m.source != rank]
        receives = [(m, b) for m, b in zip(mine_out, back, strict=True) if m.target != rank]
        _p2p(sends, receives, group, reverse=True)
        for m, b in zip(mine_out, back, strict=True):
            if m.target == rank:
                b = grads[mine_in.index(m)]
            grad_x[:, :, m.start:m.stop] += b
        return grad_x, None, None


def exchange(messages: Sequence[Message], x: torch.Tensor, *, group: dist.ProcessGroup | None
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Point-to-point messages of slices of the local tensors ``x [B, H, n, ...]`` (sliced along dim 2).

    ``messages`` is the same full list on every rank (every rank's ``x`` has the same shape); the
    result holds the slices of the messages whose ``target`` is this rank, in list order, and a
    scalar token to pass to :func:`anchor` (so the backward pass runs even on a rank that receives
    nothing). Differentiable: the backward pass sends the gradient of each received slice back to its sender,
    which adds it to the gradient of ``x`` where the slice came from.
    """
    token, *received = _Exchange.apply(x, group, tuple(messages))
    return received, token


# ----------------------------------------------------------------------------------------------------
# anchor


class _Anchor(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, result: torch.Tensor,
                *collective_outputs: torch.Tensor) -> torch.Tensor:
        ctx.meta = [(t.shape, t.dtype, t.device) for t in collective_outputs]
        return result.view_as(result)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        zeros = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.meta]
        return (grad, *zeros)


def anchor(result: torch.Tensor, *collective_outputs: torch.Tensor) -> torch.Tensor:
    """``result`` unchanged, with a zero gradient edge to each of ``collective_outputs``.

    Guarantees that the backward pass of the collectives that produced them runs on this rank even if
    ``result`` does not depend on them here (their peers on other ranks wait for it).
    """
    tensors = [t for t in collective_outputs if t.requires_grad]
    if not tensors or not torch.is_grad_enabled():
        return result
    return _Anchor.apply(result, *tensors)
