"""Gathered block attention: softmax attention where each block of queries sees its own list of keys.

The fast path of the local and sparse ops (sliding window, neighborhood, dynamic mask, HiP): the
queries are split into blocks of ``Bq`` consecutive positions, each block gathers the keys it may see
(``S`` of them) and one fused SDPA call runs every block of a chunk, so time and memory are
``O(N S D)`` instead of ``O(N M D)``.

Without a graph the chunks are written into one output. Under autograd on CPU a custom autograd
function keeps each chunk's output and log-sum-exp; its backward pass gathers the chunk's keys again
and runs the fused CPU backward kernel, adding the key and value gradients into one buffer (the
flash-attention recipe: no recomputed forward and no full-size gradient per chunk). Elsewhere (CUDA)
each chunk is checkpointed.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from attnlab.ops.validation import compute_dtype

__all__ = ["gathered_block_attention"]

# Query blocks per call are capped so that one call's gathered keys stay near this many bytes: the
# tensors then come from memory the allocator already holds (fresh multi-hundred-MiB buffers cost
# more in page faults than the attention itself on CPU), stay in cache, and the forward peak stays
# O(chunk). SDPA adds a float copy of the chunk's mask per head, several times the gathered keys: at
# 1 MiB a chunk's working set is ~10 MiB (16 MiB chunks ran 2x slower than 1 MiB ones at N = 16384).
_GATHER_CHUNK_BYTES = 1 << 20
# Under autograd with checkpointing (CUDA) the chunks are larger: each chunk's backward gives k and v a
# full-size gradient (the gather's), so the backward pass costs O(chunks * M * D) on top of the attention.
_GATHER_CHUNK_BYTES_CHECKPOINTED = 16 << 20
# ... and never fewer query rows than this per SDPA call: HiP's blocks of 32 queries over ~700 keys would
# otherwise run one small masked SDPA call each, whose fixed cost then dominates
_GATHER_CHUNK_MIN_ROWS = 512


def gathered_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_index: torch.Tensor,
                             allowed: torch.Tensor, scale: float,
                             key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention where each block of queries sees only a gathered list of keys.

    The queries are split into ``G`` blocks of ``Bq`` consecutive positions (the last block is
    padded); block ``g`` attends to the keys ``key_index[..., g, :]`` where ``allowed`` is True.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]`` (``H_kv`` divides ``H``).
        key_index: int64 ``[G, S]`` (shared by every batch element and head) or ``[B, H_kv, G, S]``;
            entries in ``[0, M)``. Padding entries may hold any valid index with ``allowed`` False.
            A key must appear at most once among the allowed entries of a query row.
        allowed: bool ``[G, Bq, S]`` or ``[B, H_kv, G, Bq, S]``; ``G * Bq >= N``.
        scale: multiplies ``q . k``.
        key_bias: optional additive bias per key ``[B, H_kv, M]`` (gathered with the keys).

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q; a query row with no allowed key returns zeros.
        The query blocks run in chunks whose gathered keys take about 1 MiB, so time is ``O(N S D)``
        and memory ``O(N D)`` plus one chunk, in the forward and the backward pass.
    """
    B, H, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, Bq, S = allowed.shape[-3:]
    if G * Bq < N:
        raise ValueError(f"allowed covers {G} blocks of {Bq} queries, fewer than N={N}")
    per_block = B * Hkv * S * _width(D, Dv, key_bias) * torch.finfo(compute_dtype(q.dtype)).bits // 8
    graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, key_bias))
    checkpointed = graph and q.device.type != "cpu"
    budget = _GATHER_CHUNK_BYTES_CHECKPOINTED if checkpointed else _GATHER_CHUNK_BYTES
    chunk = max(-(-_GATHER_CHUNK_MIN_ROWS // Bq), budget // max(per_block, 1))  # query blocks per call
    if graph and not checkpointed:
        return _GatheredAttention.apply(q, k, v, key_bias, key_index, allowed, scale, chunk)
    outputs = []
    # without a graph each chunk is written into the output (no list of chunks plus their concatenation)
    out = q.new_empty(B, H, N, Dv) if not graph else None  # (B, H, N, Dv)
    # split once: a slice per chunk would give q a full-size gradient per chunk in the backward pass
    for g0, q_chunk in zip(range(0, G, chunk), q.split(chunk * Bq, dim=2), strict=False):
        args = (q_chunk, k, v, *_chunk_lists(key_index, allowed, g0, chunk), key_bias, scale)
        if out is not None:
            out[:, :, g0 * Bq:g0 * Bq + q_chunk.shape[2]] = _gathered_chunk(*args)
        else:
            outputs.append(checkpoint(_gathered_chunk, *args, use_reentrant=False))
    if out is not None:
        return out
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def _width(D: int, Dv: int, key_bias: torch.Tensor | None) -> int:
    """The common feature width of the fused call: ``max(D + [bias], Dv)`` rounded up to a multiple of 8."""
    return -(-max(D + (key_bias is not None), Dv) // 8) * 8


def _chunk_lists(key_index: torch.Tensor, allowed: torch.Tensor, g0: int,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key lists and masks of query blocks ``g0 .. g0 + chunk``."""
    g1 = g0 + chunk
    index = key_index[g0:g1] if key_index.ndim == 2 else key_index[:, :, g0:g1]
    return index, allowed[g0:g1] if allowed.ndim == 3 else allowed[:, :, g0:g1]


def _chunk_starts(G: int, Bq: int, N: int, chunk: int) -> list[tuple[int, slice]]:
    """``(first block, query rows)`` of each chunk of ``chunk`` query blocks."""
    return [(g0, slice(g0 * Bq, min(N, (g0 + chunk) * Bq))) for g0 in range(0, G, chunk)]


def _key_rows(key_index: torch.Tensor, B: int, Hkv: int, M: int) -> torch.Tensor:
    """Rows of the flattened ``[B * H_kv * M]`` keys listed by ``key_index``: ``[B * H_kv * G * S]``."""
    G, S = key_index.shape[-2:]
    first = torch.arange(B * Hkv, device=key_index.device).reshape(B, Hkv, 1) * M  # first row of each (b, h)
    return (key_index.reshape(*key_index.shape[:-2], G * S) + first).reshape(-1)


def _blocked_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_index: torch.Tensor,
                    allowed: torch.Tensor, key_bias: torch.Tensor | None, scale: float, *,
                    additive: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor | None]:
    """The fused call's inputs for one chunk: ``qb [B*H_kv, G, group*Bq, W]``, ``kb, vb [B*H_kv, G, S, W]``,
    the mask ``[.., G, group*Bq, S]`` and the rows with no allowed key ``[.., G, group*Bq, 1]`` (or None).

    ``additive=False``: a boolean mask for SDPA, whose kernels may return NaN on a row without keys, so
    such rows get one key here and are to be zeroed afterwards (the returned rows). ``additive=True``: the
    ``[B*H_kv | 1, G, group*Bq, S]`` mask of 0 / -inf the fused CPU kernels take; they return zeros and
    pass no gradient on a row without keys, so no rows are returned.

    The key bias rides in one extra feature: ``[scale q, 1] . [k, bias] = scale q.k + bias``; the fused
    kernels want one width for q, k and v, so all three are zero-padded to a multiple of 8 (no copy
    when they already have it). The query heads sharing a kv head become extra query rows of its blocks.
    """
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, Bq, S = allowed.shape[-3:]
    group = H // Hkv
    dtype = compute_dtype(q.dtype)
    rows = _key_rows(key_index, B, Hkv, M)
    kg = k.reshape(B * Hkv * M, D).index_select(0, rows).reshape(B, Hkv, G * S, D).to(dtype)
    vg = v.reshape(B * Hkv * M, Dv).index_select(0, rows).reshape(B, Hkv, G * S, Dv).to(dtype)
    width = _width(D, Dv, key_bias)
    qs = q.to(dtype) * scale
    if key_bias is not None:
        bias = key_bias.reshape(-1).index_select(0, rows).reshape(B, Hkv, G * S, 1)  # (B, H_kv, G*S, 1)
        qs = torch.cat([qs, qs.new_ones(B, H, N, 1)], dim=-1)  # (B, H, N, D + 1)
        kg = torch.cat([kg, bias.to(dtype)], dim=-1)  # (B, H_kv, G*S, D + 1)
    if width > qs.shape[-1] or G * Bq > N:
        qs = torch.nn.functional.pad(qs, (0, width - qs.shape[-1], 0, G * Bq - N))  # (B, H, G*Bq, W)
    if width > kg.shape[-1]:
        kg = torch.nn.functional.pad(kg, (0, width - kg.shape[-1]))  # (B, H_kv, G*S, W)
    if width > Dv:
        vg = torch.nn.functional.pad(vg, (0, width - Dv))  # (B, H_kv, G*S, W)
    qb = rearrange(qs, "b (hk g) (c q) d -> (b hk) c (g q) d", hk=Hkv, c=G)  # (B*H_kv, G, group*Bq, W)
    kb = rearrange(kg, "b hk (c s) d -> (b hk) c s d", c=G)  # (B*H_kv, G, S, W)
    vb = rearrange(vg, "b hk (c s) d -> (b hk) c s d", c=G)  # (B*H_kv, G, S, W)
    mask = allowed if allowed.ndim == 3 else rearrange(allowed, "b hk c q s -> (b hk) c q s")
    empty = None
    if additive:
        mask = torch.where(mask, torch.tensor(0.0, dtype=qb.dtype), torch.tensor(float("-inf"), dtype=qb.dtype))
        if mask.ndim == 3:
            mask = mask[None]  # (1, G, Bq, S)
    else:
        empty = ~mask.any(dim=-1, keepdim=True)  # rows with no allowed key (padding rows, normally)
        if bool(empty.any()):  # give them one key so the softmax is defined; their output is zeroed
            mask = mask | (empty & (torch.arange(S, device=q.device) == 0))
        else:
            empty = None
    if group > 1:
        mask = mask.unsqueeze(-3).expand(*mask.shape[:-2], group, Bq, S).flatten(-3, -2)  # (.., G, group*Bq, S)
        if empty is not None:
            empty = empty.unsqueeze(-3).expand(*empty.shape[:-2], group, Bq, 1).flatten(-3, -2)
    return qb, kb, vb, mask, empty


def _unblock(out: torch.Tensor, B: int, N: int, Dv: int, group: int) -> torch.Tensor:
    """``[B*H_kv, G, group*Bq, W] -> [B, H, N, Dv]``: the fused call's rows back in sequence order."""
    return rearrange(out[..., :Dv], "(b hk) c (g q) e -> b (hk g) (c q) e", b=B, g=group)[:, :, :N]


def _gathered_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_index: torch.Tensor,
                    allowed: torch.Tensor, key_bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`gathered_block_attention` of the query blocks of ``allowed`` (``q`` holds their rows)."""
    qb, kb, vb, mask, empty = _blocked_inputs(q, k, v, key_index, allowed, key_bias, scale)
    out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=1.0)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return _unblock(out, q.shape[0], q.shape[2], v.shape[-1], q.shape[1] // k.shape[1]).to(q.dtype)


class _GatheredAttention(torch.autograd.Function):
    """Gathered block attention on CPU with a flash-style backward pass.

    Forward: per chunk, the fused CPU kernel's output and log-sum-exp (``O(N)``) are kept. Backward:
    per chunk, the keys are gathered again, the fused CPU backward kernel gives the gradients of the
    blocked q, k, v, and those of k, v (and the key bias) are added into one ``[B*H_kv*M, W]`` buffer
    with ``index_add_``.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None,
                key_index: torch.Tensor, allowed: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
        B, H, N, _ = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        G, Bq = allowed.shape[-3:-1]
        out = q.new_empty(B, H, N, Dv)  # (B, H, N, Dv)
        kept = []
        for g0, rows in _chunk_starts(G, Bq, N, chunk):
            qb, kb, vb, mask, _ = _blocked_inputs(q[:, :, rows], k, v, *_chunk_lists(key_index, allowed, g0, chunk),
                                                  key_bias, scale, additive=True)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, kb, vb, attn_mask=mask, scale=1.0)
            kept += [o, lse]
            out[:, :, rows] = _unblock(o, B, rows.stop - rows.start, Dv, H // Hkv)
        ctx.save_for_backward(q, k, v, key_bias, key_index, allowed, *kept)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, key_bias, key_index, allowed, *kept = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        B, H, N, D = q.shape
        Hkv, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
        G, Bq, S = allowed.shape[-3:]
        dtype = compute_dtype(q.dtype)
        width = _width(D, Dv, key_bias)
        grad_q = torch.empty(B, H, N, D, dtype=dtype)  # (B, H, N, D), every row written by its chunk
        grad_k = torch.zeros(B * Hkv * M, width, dtype=dtype)  # k's features, then the bias's
        grad_v = torch.zeros(B * Hkv * M, width, dtype=dtype)
        for part, (g0, rows) in enumerate(_chunk_starts(G, Bq, N, chunk)):
            index, mask = _chunk_lists(key_index, allowed, g0, chunk)
            qb, kb, vb, mask, _ = _blocked_inputs(q[:, :, rows], k, v, index, mask, key_bias, scale, additive=True)
            blocks = qb.shape[1]
            g = grad_out[:, :, rows].to(dtype)  # (B, H, n, Dv)
            g = torch.nn.functional.pad(g, (0, width - Dv, 0, blocks * Bq - g.shape[2]))  # (B, H, blocks*Bq, W)
            gb = rearrange(g, "b (hk g) (c q) d -> (b hk) c (g q) d", hk=Hkv, c=blocks)
            o, lse = kept[2 * part], kept[2 * part + 1]
            dqb, dkb, dvb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                gb.contiguous(), qb, kb, vb, o, lse, 0.0, False, attn_mask=mask, scale=1.0)
            dq = rearrange(dqb, "(b hk) c (g q) d -> b (hk g) (c q) d", b=B, g=H // Hkv)
            grad_q[:, :, rows] = dq[:, :, :rows.stop - rows.start, :D] * scale
            key_rows = _key_rows(index, B, Hkv, M)
            grad_k.index_add_(0, key_rows, dkb.reshape(-1, width))
            grad_v.index_add_(0, key_rows, dvb.reshape(-1, width))
        needs = ctx.needs_input_grad
        dk = grad_k[:, :D].reshape(B, Hkv, M, D).to(k.dtype) if needs[1] else None
        dv = grad_v[:, :Dv].reshape(B, Hkv, M, Dv).to(v.dtype) if needs[2] else None
        dbias = grad_k[:, D].reshape(B, Hkv, M).to(key_bias.dtype) if key_bias is not None and needs[3] else None
        return grad_q.to(q.dtype) if needs[0] else None, dk, dv, dbias, None, None, None, None
