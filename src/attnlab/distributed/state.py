"""The state strategy for the linear family: local states, a prefix combination across ranks, a local pass.

A linear-attention recurrence ``S_t = f(S_{t-1}, k_t, v_t)`` whose steps compose associatively lets each
rank summarise its chunk of keys in one state ``e_c`` (what the chunk adds, starting from nothing).
After one all-gather of these summaries, chunk ``c`` starts from ``S0 * e_0 * ... * e_{c-1}`` (the
combination "then"), passed as the op's own ``initial_state``; a bidirectional op takes every other
chunk instead. Communication: one state per chunk, independent of the sequence length.

The rules (state, what a chunk adds, how two combine):

- ``linear`` (Katharopoulos et al., arXiv 2006.16236, eqs. 18-20): ``(S, z)``, ``e = (phi(K)^T V,
  phi(K)^T 1)``, ``a * b = a + b``.
- ``lightning`` (Lightning Attention-2, arXiv 2401.04658, eq. 2): ``S``; a chunk of ``m`` tokens adds
  ``F = sum_j lambda^(m-1-j) k_j^T v_j`` and ``a * b = lambda^m a + F_b`` (the decay is applied in
  the prefix combination; its gradient flows from every rank).
- ``lightnet`` (LightNet, arXiv 2405.21022): ``(S = A / Z, z = log Z)``, ``e = (sum_j softmax_j(k)
  v_j, logsumexp_j k_j)``, combined by ``logaddexp`` with weights ``exp(z_a - z)``, ``exp(z_b - z)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from attnlab.distributed.comm import all_gather_stacked, anchor, group_rank
from attnlab.distributed.sharding import SequenceLayout
from attnlab.ops.lightning import check_decay
from attnlab.ops.linear import resolve_feature_map
from attnlab.ops.validation import compute_dtype, expand_kv
from attnlab.registry import get

__all__ = ["STATE_RULES", "StateRule", "state_attention"]

State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class StateRule:
    """How one mechanism's recurrence splits: its state, a chunk's summary and their combination."""

    name: str
    summary: Callable[[torch.Tensor, torch.Tensor, dict[str, Any], int], State]
    combine: Callable[[State, State, int, dict[str, Any]], State]
    as_op_state: Callable[[State], Any]
    from_op_state: Callable[[Any], State]
    sequence_options: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------
# linear


def _linear_summary(k: torch.Tensor, v: torch.Tensor, options: dict[str, Any], heads: int) -> State:
    dtype = compute_dtype(k.dtype)
    phi = resolve_feature_map(options.get("feature_map", "elu+1"))
    fk = phi(expand_kv(k, heads).to(dtype))  # (B, H, m, F)
    vf = expand_kv(v, heads).to(dtype)  # (B, H, m, Dv)
    return torch.einsum("bhmf,bhme->bhfe", fk, vf), fk.sum(2)


def _add(a: State, b: State, tokens: int, options: dict[str, Any]) -> State:
    return tuple(x + y for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------------
# lightning


def _lightning_rates(options: dict[str, Any], heads: int, like: torch.Tensor) -> torch.Tensor | None:
    return check_decay(options.get("decay"), heads, device=like.device, dtype=like.dtype)


def _lightning_summary(k: torch.Tensor, v: torch.Tensor, options: dict[str, Any], heads: int) -> State:
    dtype = compute_dtype(k.dtype)
    kf, vf = expand_kv(k, heads).to(dtype), expand_kv(v, heads).to(dtype)  # (B, H, m, D|Dv)
    m = kf.shape[2]
    rates = _lightning_rates(options, heads, kf)
    if rates is None:
        return (torch.einsum("bhjd,bhje->bhde", kf, vf),)
    age = torch.arange(m - 1, -1, -1, device=k.device, dtype=dtype)  # (m,): m - 1 - j
    weights = torch.exp(-rates[:, None] * age)  # (H, m): lambda^(m-1-j)
    return (torch.einsum("bhjd,hj,bhje->bhde", kf, weights, vf),)


def _lightning_combine(a: State, b: State, tokens: int, options: dict[str, Any]) -> State:
    rates = _lightning_rates(options, a[0].shape[1], a[0])
    if rates is None:
        return (a[0] + b[0],)
    return (torch.exp(-rates * tokens)[None, :, None, None] * a[0] + b[0],)  # lambda^m a + F_b


# ----------------------------------------------------------------------------------------------------
# lightnet


def _lightnet_summary(k: torch.Tensor, v: torch.Tensor, options: dict[str, Any], heads: int) -> State:
    dtype = compute_dtype(k.dtype)
    kf, vf = expand_kv(k, heads).to(dtype), expand_kv(v, heads).to(dtype)
    z = torch.logsumexp(kf, dim=2)  # (B, H, D)
    S = torch.einsum("bhmd,bhme->bhde", torch.exp(kf - z[:, :, None]), vf)  # (B, H, D, Dv)
    return S, z


def _lightnet_combine(a: State, b: State, tokens: int, options: dict[str, Any]) -> State:
    (Sa, za), (Sb, zb) = a, b
    z = torch.logaddexp(za, zb)
    return torch.exp(za - z)[..., None] * Sa + torch.exp(zb - z)[..., None] * Sb, z


def _pair(state: Any) -> State:
    return tuple(state)


def _single(state: Any) -> State:
    return (state,)


STATE_RULES: dict[str, StateRule] = {
    "linear": StateRule("linear", _linear_summary, _add, tuple, _pair),
    "lightning": StateRule("lightning", _lightning_summary, _lightning_combine, lambda s: s[0], _single),
    "lightnet": StateRule("lightnet", _lightnet_summary, _lightnet_combine, tuple, _pair,
                          sequence_options=("key_gain",)),
}


def _pack(state: State) -> torch.Tensor:
    return torch.cat([s.reshape(-1) for s in state])


def _unpack(flat: torch.Tensor, like: State) -> State:
    pieces, start = [], 0
    for s in like:
        pieces.append(flat[start:start + s.numel()].view_as(s))
        start += s.numel()
    return tuple(pieces)


def state_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mechanism: str,
                    group: dist.ProcessGroup | None, layout: SequenceLayout, causal: bool, length: int,
                    options: dict[str, Any]) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """Run ``mechanism`` (a key of :data:`STATE_RULES`) on this rank's shard with the states of the others.

    Inputs are validated by :func:`context_parallel_attention`; ``options`` are the op's options
    (``initial_state`` and ``return_state`` included).

    Returns:
        ``[B, H, n, Dv]`` (and the final state, the same on every rank, with ``return_state=True``).
    """
    rule = STATE_RULES[mechanism]
    op = get(mechanism)
    options = dict(options)
    initial = options.pop("initial_state", None)
    return_state = bool(options.pop("return_state", False))
    B, H, n, _ = q.shape
    rank = group_rank(group)
    cpr = layout.chunks_per_rank
    size = n // cpr
    dtype = compute_dtype(q.dtype)

    def real(chunk: int) -> int:  # real (unpadded) tokens of a global chunk
        return max(0, min(size, length - chunk * size))

    mine = layout.chunks(rank)
    summaries = []
    for position, chunk in enumerate(mine):
        rows = slice(position * size, position * size + real(chunk))
        summary = rule.summary(k[:, :, rows], v[:, :, rows], options, H)
        summaries.append(_pack(summary))
    like = rule.summary(k[:, :, :1], v[:, :, :1], options, H)  # shapes of one state
    table = all_gather_stacked(torch.stack(summaries), group=group)  # (W, cpr, state floats)
    by_chunk: list[State] = [()] * layout.num_chunks
    for r in range(layout.world):
        for position, chunk in enumerate(layout.chunks(r)):
            by_chunk[chunk] = _unpack(table[r, position], like)

    start = None if initial is None else tuple(s.to(dtype) for s in rule.from_op_state(initial))

    def then(a: State | None, chunk: int) -> State:
        return by_chunk[chunk] if a is None else rule.combine(a, by_chunk[chunk], real(chunk), options)

    outputs = []
    for position, chunk in enumerate(mine):
        m = real(chunk)
        rows = slice(position * size, position * size + m)
        before = start
        others = range(chunk) if causal else [c for c in range(layout.num_chunks) if c != chunk]
        for c in others:
            if real(c):
                before = then(before, c)
        out_chunk = q.new_zeros(B, H, size, v.shape[-1])
        if m:
            result = op(q[:, :, rows], k[:, :, rows], v[:, :, rows], causal=causal,
                        initial_state=None if before is None else rule.as_op_state(before), **options)
            out_chunk = torch.cat([result, out_chunk[:, :, m:]], dim=2) if m < size else result
        outputs.append(out_chunk)
    out = anchor(torch.cat(outputs, dim=2), table)  # every rank enters the backward reduce-scatter
    if not return_state:
        return out
    final = start
    for c in range(layout.num_chunks):
        if real(c):
            final = then(final, c)
    return out, rule.as_op_state(final)
