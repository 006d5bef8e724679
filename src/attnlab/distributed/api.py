"""``context_parallel_attention``: one call, any strategy, the same result as the op on the whole sequence.

Before any collective that moves data, every rank checks its own arguments, then one all-gather of a
small integer tensor (the shapes, the options' fingerprint and a possible error message) lets every rank
see every other rank's request: if one rank's input is wrong, or the ranks disagree (different shard
lengths, heads, options), every rank raises the same error, and none enters a collective that its peers
never reach.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist

from attnlab.distributed.comm import _ALL_GATHER, group_rank, group_size
from attnlab.distributed.halo import HALO_MECHANISMS, halo_attention, halo_reach
from attnlab.distributed.ring import ring_attention
from attnlab.distributed.sharding import LAYOUTS, SequenceLayout, check_layout
from attnlab.distributed.state import STATE_RULES, state_attention
from attnlab.distributed.ulysses import PER_HEAD_OPTIONS, ulysses_attention
from attnlab.ops.validation import check_causal, check_qkv, check_scale
from attnlab.registry import Mechanism, get

__all__ = ["STRATEGIES", "context_parallel_attention", "strategy_bytes", "serving_strategies"]

logger = logging.getLogger("attnlab.distributed")

STRATEGIES = ("ring", "state", "halo", "ulysses")
Strategy = Literal["auto", "ring", "state", "halo", "ulysses"]
# options holding a tensor over the sequence: a shard of them would need its own exchange
SEQUENCE_OPTIONS = ("attn_mask", "key_padding_mask", "key_gain", "key_bias")
STATE_OPTIONS = ("initial_state", "return_state")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, NotImplementedError, KeyError)
_MESSAGE_BYTES = 480
_FIELDS = ("error", "batch", "heads", "kv_heads", "local_length", "head_dim", "value_dim", "dtype", "causal",
           "strategy", "layout", "length", "mechanism", "options", "q.requires_grad", "k.requires_grad",
           "v.requires_grad")


# ----------------------------------------------------------------------------------------------------
# what each strategy costs and serves


def _state_floats(mechanism: str, batch: int, heads: int, head_dim: int, value_dim: int) -> int:
    if mechanism == "lightning":
        return batch * heads * head_dim * value_dim
    return batch * heads * head_dim * (value_dim + 1)  # (S, z): linear (F = D for the built-in maps), lightnet


def strategy_bytes(strategy: str, *, mechanism: str, world: int, batch: int, heads: int, kv_heads: int,
                   local_length: int, head_dim: int, value_dim: int, element_size: int = 4,
                   layout: str = "contiguous", reach: tuple[int, int] = (0, 0), rank: int | None = None) -> int:
    """Bytes one rank sends in one forward and backward pass of ``strategy`` (the formula).

    ``n = local_length`` tokens per rank, ``e = element_size`` (inputs), ``c`` = bytes of the compute
    dtype (4 for 16/32-bit inputs, 8 for float64), ``W = world``:

    - ring: keys/values go round once forward and once backward, ``2 (W-1) B H_kv n (D+Dv) e``, and the
      key/value gradient accumulators travel ``W`` hops, ``W B H_kv n (D+Dv) c``;
    - ulysses: four all-to-alls (q, k, v in; out back; and their reverses), each sending ``(W-1)/W`` of
      ``B n (H D + H_kv (D + Dv) + H Dv) e`` in total;
    - state: an all-gather of one state per chunk, and its reduce-scatter: ``2 (W-1) cpr s c`` with
      ``s`` floats of state (``cpr`` chunks per rank);
    - halo: forward, the last ``L`` and first ``R`` keys/values of each chunk to the neighbouring chunks held
      by other ranks; backward, the gradients of the halos received go back: ``(L + R) B H_kv (D+Dv) e``
      per chunk border with another rank (``rank`` picks the rank; the default is the largest over ranks).
    """
    W, B, n = world, batch, local_length
    compute = 8 if element_size == 8 else 4
    kv = B * kv_heads * n * (head_dim + value_dim)
    spec = SequenceLayout(layout, W)
    cpr = spec.chunks_per_rank
    if strategy == "ring":
        return 2 * (W - 1) * kv * element_size + W * kv * compute
    if strategy == "ulysses":
        total = B * n * (heads * head_dim + kv_heads * (head_dim + value_dim) + heads * value_dim)
        return 2 * ((W - 1) * total // W) * element_size
    if strategy == "state":
        return 2 * (W - 1) * cpr * _state_floats(mechanism, B, heads, head_dim, value_dim) * compute
    if strategy == "halo":
        before, after = reach
        per_token = B * kv_heads * (head_dim + value_dim) * element_size
        sent = []
        for r in range(W) if rank is None else [rank]:
            tokens = 0
            for chunk in spec.chunks(r):
                # forward: my boundary keys to a neighbour chunk on another rank; backward: the gradient of
                # each halo I received goes back to its owner (neighbours on this rank are copies)
                if chunk + 1 < spec.num_chunks and spec.owner(chunk + 1)[0] != r:
                    tokens += before + after  # my last L keys out, the gradient of its first R keys back
                if chunk > 0 and spec.owner(chunk - 1)[0] != r:
                    tokens += after + before
            sent.append(tokens)
        return max(sent) * per_token
    raise ValueError(f"strategy={strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}")


def _refusal(strategy: str, record: Mechanism, *, world: int, heads: int, kv_heads: int, chunk: int,
             length: int, causal: bool, options: Mapping[str, Any]) -> str | None:
    """Why ``strategy`` cannot serve this request exactly, or ``None``."""
    name = record.name
    if record.op is None:
        return f"mechanism {name!r} has no functional op (only the layer attnlab.nn.{record.layer.__name__})"
    sequence = [o for o in SEQUENCE_OPTIONS if options.get(o) is not None]
    if sequence:
        return (f"option {sequence[0]} is a tensor over the whole sequence; context parallelism takes scalar "
                f"options (and lightning's per-head decay) only")
    if strategy != "state" and (options.get("initial_state") is not None or options.get("return_state")):
        return "initial_state / return_state are kept by strategy='state' only (the linear family)"
    if strategy == "ring" and name != "softmax":
        return f"strategy='ring' serves mechanism='softmax' only, not {name!r}"
    if strategy == "state" and name not in STATE_RULES:
        return f"strategy='state' serves the recurrences {', '.join(STATE_RULES)} only, not {name!r}"
    if strategy == "halo":
        if name not in HALO_MECHANISMS:
            return f"strategy='halo' serves {', '.join(HALO_MECHANISMS)} only, not {name!r}"
        try:
            before, after = halo_reach(name, length=length, causal=causal, options=dict(options), chunk=chunk)
        except (ValueError, TypeError) as error:  # e.g. a 2-D grid, a missing window
            return str(error)
        if max(before, after) > chunk:
            return (f"strategy='halo': a query reads up to {before} keys before and {after} after itself, more "
                    f"than one chunk of {chunk} tokens; use fewer ranks, a longer sequence, layout='contiguous' "
                    f"(zigzag halves the chunks) or strategy='ulysses'")
    if strategy == "ulysses":
        if heads % world or kv_heads % world:
            return (f"strategy='ulysses' splits heads over the {world} ranks: H={heads} and H_kv={kv_heads} must "
                    f"both be multiples of {world}")
        tensors = [o for o, value in options.items() if isinstance(value, torch.Tensor)
                   and o not in PER_HEAD_OPTIONS]
        if tensors:
            return f"strategy='ulysses' passes scalar options and per-head decay only, got tensor option {tensors[0]}"
    return None


def serving_strategies(mechanism: str, *, world: int, heads: int, kv_heads: int, chunk: int, length: int,
                       causal: bool, options: Mapping[str, Any]) -> dict[str, str | None]:
    """For each strategy: ``None`` where it serves the request exactly, else the reason it does not."""
    record = get(mechanism)
    return {s: _refusal(s, record, world=world, heads=heads, kv_heads=kv_heads, chunk=chunk, length=length,
                        causal=causal, options=options) for s in STRATEGIES}


# ----------------------------------------------------------------------------------------------------
# agreement across ranks


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{value.dtype}"
    if isinstance(value, tuple | list):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    if callable(value):
        return f"callable:{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def _fingerprint(text: str) -> int:
    return zlib.crc32(text.encode())


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _agree(header: list[int], error: Exception | None, group: dist.ProcessGroup | None) -> None:
    """All-gather every rank's header and error; raise the same error on every rank if any."""
    world = group_size(group)
    text = "" if error is None else (error.args[0] if isinstance(error, KeyError) and error.args else str(error))
    message = text.encode()[:_MESSAGE_BYTES]
    code = 0 if error is None else 1 + next((i for i, t in enumerate(_ERRORS) if isinstance(error, t)), 0)
    payload = torch.zeros(len(_FIELDS) + 1 + _MESSAGE_BYTES, dtype=torch.int64)
    payload[: len(_FIELDS)] = torch.tensor([code, *header[1:]], dtype=torch.int64)
    payload[len(_FIELDS)] = len(message)
    if message:
        payload[len(_FIELDS) + 1: len(_FIELDS) + 1 + len(message)] = torch.tensor(list(message), dtype=torch.int64)
    device = _collective_device(group)
    table = torch.zeros(world * payload.numel(), dtype=torch.int64, device=device)
    _ALL_GATHER(table, payload.to(device), group=group)
    table = table.cpu().view(world, -1)
    codes = table[:, 0].tolist()
    failed = [r for r, c in enumerate(codes) if c]
    if failed:
        texts = []
        for r in failed:
            size = int(table[r, len(_FIELDS)])
            texts.append(bytes(table[r, len(_FIELDS) + 1: len(_FIELDS) + 1 + size].tolist()).decode(errors="replace"))
        kind = _ERRORS[int(codes[failed[0]]) - 1]
        if len(failed) == world and len(set(texts)) == 1 and len(set(codes)) == 1:
            raise kind(f"context_parallel_attention: {texts[0]}")  # every rank refused the same request
        raise kind(f"context_parallel_attention: rank {failed[0]} refused its input: {texts[0]}")
    for index, name in enumerate(_FIELDS[1:], start=1):
        values = table[:, index].tolist()
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {value}" for r, value in enumerate(values))
            what = "a fingerprint of " if name in ("mechanism", "options") else ""
            raise ValueError(
                f"context_parallel_attention: the ranks disagree on {what}{name} ({shown}); every rank must pass "
                f"the same mechanism, options and shapes, with shards of equal length (shard_sequence(..., "
                f"pad=True) pads the last one)"
            )


# ----------------------------------------------------------------------------------------------------
# the call


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mechanism: str,
                               group: dist.ProcessGroup | None = None, strategy: Strategy = "auto",
                               layout: Literal["contiguous", "zigzag"] = "contiguous", causal: bool | None = None,
                               length: int | None = None, **options: Any) -> Any:
    """Attention over a sequence split across the ranks of ``group``: this rank's shard of the op's output.

    Context parallelism: the ranks hold consecutive pieces of one sequence (``layout="contiguous"``) or
    the load-balanced ``"zigzag"`` pieces (see :mod:`attnlab.distributed.sharding`); the result on each
    rank equals its shard of ``attnlab.attention(q_all, k_all, v_all, mechanism=..., **options)`` and
    gradients reach the local q, k, v (and learned options such as lightning's ``decay``) as in one
    process. Strategies (see ``docs/distributed.md``):

    - "ring": softmax (Ring Attention, arXiv 2310.01889), causal and bidirectional;
    - "state": linear, lightning, lightnet (prefix combination of recurrent states);
    - "halo": sliding_window and 1-D neighborhood (boundary keys from neighbouring ranks);
    - "ulysses": any registered op (DeepSpeed Ulysses, arXiv 2309.14509), heads divisible by ``W``;
    - "auto": the exact strategy sending the fewest bytes (:func:`strategy_bytes`), logged at DEBUG level
      on the ``attnlab.distributed`` logger.

    Args:
        q: ``[B, H, n, D]``; k: ``[B, H_kv, n, D]``; v: ``[B, H_kv, n, Dv]``: this rank's shard, every rank
            with the same shapes (``n`` even for zigzag).
        mechanism: a registered mechanism with a functional op.
        group: the ranks sharing the sequence (default: the whole world); at least 2.
        strategy, layout: as above.
        causal: default True for causal-only mechanisms, else False.
        length: real tokens of the whole sequence when :func:`shard_sequence` padded the end
            (``pad=True``); padded keys are masked, padded queries return zeros.
        **options: the op's keyword options (``window=``, ``decay=``, ``initial_state=``, ...). Replicated
            tensors such as ``decay`` and ``initial_state`` receive on each rank the part of the gradient that
            flows from that rank's outputs: their sum over ranks (an all-reduce, as DDP does for
            parameters) is the one-process gradient. ``return_state=True`` returns the final state on every
            rank (the same tensor); use it in the loss of one rank only.

    Returns:
        ``[B, H, n, Dv]`` in q's dtype (and the final state with ``return_state=True``).

    Raises:
        ValueError / TypeError / NotImplementedError / KeyError, the same on every rank, before any
        data moves: bad input on any rank, ranks that disagree, a group of one, a strategy that cannot
        serve the mechanism, heads not divisible for Ulysses. Every rank must call this function the same
        number of times, and backpropagate through its output when any rank does.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(gloo on CPUs, nccl on GPUs) on every rank first, e.g. under torchrun")
    world = group_size(group)
    if world < 2:
        raise ValueError(f"group has {world} rank: context parallelism needs at least 2; call the op directly "
                         f"(attnlab.attention(q, k, v, mechanism={mechanism!r}, ...)) on a single process")
    rank = group_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group: call context_parallel_attention only on the ranks "
                         "of the group that shares the sequence")
    header = [0] * len(_FIELDS)
    error: Exception | None = None
    plan: tuple[str, Mechanism, SequenceLayout, bool, int] | None = None
    try:
        plan = _plan(q, k, v, mechanism=mechanism, world=world, rank=rank, strategy=strategy, layout=layout,
                     causal=causal, length=length, options=options, header=header)
    except Exception as caught:  # noqa: BLE001 - whatever it is, the other ranks must hear of it, not hang
        error = caught
    _agree(header, error, group)
    assert plan is not None
    chosen, record, spec, causal_flag, real_length = plan
    arguments = dict(group=group, layout=spec, causal=causal_flag, length=real_length)
    if chosen == "ring":
        out = ring_attention(q, k, v, scale=options.get("scale"), **arguments)
    elif chosen == "state":
        out = state_attention(q, k, v, mechanism=record.name, options=options, **arguments)
    elif chosen == "halo":
        out = halo_attention(q, k, v, mechanism=record.name, options=options, **arguments)
    else:
        out = ulysses_attention(q, k, v, mechanism=record.name, options=options, **arguments)
    n = q.shape[2]
    if real_length < world * n:  # padded queries return zeros
        real = spec.positions(rank, n, q.device) < real_length  # (n,)
        if isinstance(out, tuple):
            out = (out[0] * real[:, None].to(out[0].dtype), *out[1:])
        else:
            out = out * real[:, None].to(out.dtype)
    return out


def _plan(q: Any, k: Any, v: Any, *, mechanism: str, world: int, rank: int, strategy: str, layout: str,
          causal: bool | None, length: int | None, options: dict[str, Any], header: list[int]
          ) -> tuple[str, Mechanism, SequenceLayout, bool, int]:
    """Check this rank's arguments, fill ``header`` (what the ranks must agree on), choose the strategy."""
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of 'auto', {', '.join(map(repr, STRATEGIES))}")
    check_layout(layout)
    record = get(mechanism)
    sizes = check_qkv(q, k, v)
    B, H, Hkv, n, M, D, Dv = sizes
    if M != n:
        raise ValueError(f"context parallelism splits one sequence: k, v must have the local length of q "
                         f"(n={n}), got {M}")
    causal = record.causal_only if causal is None else check_causal(causal)
    record._check_causal(causal)
    spec = SequenceLayout(layout, world)
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout='zigzag' holds two equal chunks per rank: the local length n={n} must be even")
    if length is None:
        length = world * n
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= world * n:
        raise ValueError(f"length={length!r} must be an int in [1, W n = {world * n}] (the real tokens of the "
                         f"whole sequence)")
    header[1:] = [B, H, Hkv, n, D, Dv, _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 99, int(causal),
                  (("auto",) + STRATEGIES).index(strategy), LAYOUTS.index(layout), length,
                  _fingerprint(record.name),
                  _fingerprint("|".join(f"{key}={_describe(options[key])}" for key in sorted(options))),
                  int(q.requires_grad), int(k.requires_grad), int(v.requires_grad)]
    unknown = [o for o in options if not record.accepts(o)]
    if unknown:
        raise TypeError(f"mechanism {record.name!r} has no option(s) {', '.join(unknown)}")
    check_scale(options.get("scale"), D)
    chunk = n // spec.chunks_per_rank
    refusals = serving_strategies(record.name, world=world, heads=H, kv_heads=Hkv, chunk=chunk, length=length,
                                  causal=causal, options=options)
    if strategy != "auto":
        if refusals[strategy] is not None:
            raise ValueError(f"mechanism={record.name!r}, strategy={strategy!r}: {refusals[strategy]}"
                             + _alternatives(refusals))
        return strategy, record, spec, causal, length
    serving = [s for s in STRATEGIES if refusals[s] is None]
    if not serving:
        reasons = "; ".join(f"{s}: {r}" for s, r in refusals.items())
        raise ValueError(f"no context-parallel strategy serves mechanism={record.name!r} here ({reasons})")
    element = torch.empty((), dtype=q.dtype).element_size()
    reach = (0, 0)
    if "halo" in serving:
        reach = halo_reach(record.name, length=length, causal=causal, options=options, chunk=chunk)
    costs = {s: strategy_bytes(s, mechanism=record.name, world=world, batch=B, heads=H, kv_heads=Hkv,
                               local_length=n, head_dim=D, value_dim=Dv, element_size=element, layout=layout,
                               reach=reach) for s in serving}
    chosen = min(serving, key=lambda s: costs[s])  # ties: the order of STRATEGIES
    logger.debug("context_parallel_attention: mechanism=%s causal=%s layout=%s W=%d -> strategy=%s "
                 "(bytes per rank, forward+backward: %s)", record.name, causal, layout, world, chosen,
                 ", ".join(f"{s}={c}" for s, c in costs.items()))
    return chosen, record, spec, causal, length


def _alternatives(refusals: Mapping[str, str | None]) -> str:
    serving = [s for s, reason in refusals.items() if reason is None]
    return f" (strategies that serve it here: {', '.join(serving)})" if serving else ""
