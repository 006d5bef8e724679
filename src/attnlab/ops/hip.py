"""HiP attention: training-free hierarchically pruned block-sparse attention.

Lee et al., "A Training-free Sub-quadratic Cost Transformer Model Serving Framework With
Hierarchically Pruned Attention" (HiP, ICLR 2025, arXiv 2406.09827); InfiniteHiP (arXiv 2502.08910).
Reference algorithm: the v1.1 numba kernel ``masking_iteration_draft_numba_kernel`` of
DeepAuto-AI/hip-attention (branching factor 2), then block-sparse softmax attention over the
selected key blocks plus a sliding window and sink tokens.

Per query block (``block_size_q`` queries), over the candidate keys ``[0, T)`` with
``T = (last query position + 1) - window``, cut into ``ceil(T / block_size_k)`` key blocks,
keep ``K = ceil(k_budget / block_size_k)`` blocks:

1. if there are at most ``K`` blocks, keep them all;
2. split the blocks into ``K`` equal groups (group ``j`` starts at ``floor(blocks * j / K)``);
3. while a group holds more than one block: split every group in two (the second half starts at
   ``start + floor(size / 2)``), score each non-empty half by its representative (its first key
   block): ``max`` of ``q . k`` over every ``query_stride``-th query of the block and the keys of that
   key block; keep the ``K`` best halves;
4. the kept groups (one block each) are the selected key blocks.

Attention then is exact softmax over the union of the selected blocks, the last ``window``
keys of each query and the first ``sink_tokens`` keys, under the causal mask.
[INFERRED] The representative is the first key block (v1.1); v1.0 samples it at random. The
selection of a query block is shared by its queries, so with ``block_size_q > 1`` a query's keys
depend on the other queries of its block (as in the paper's kernels).
"""

from __future__ import annotations

from typing import Literal

import torch

from attnlab.ops.gathered_blocks import gathered_block_attention
from attnlab.ops.nonfinite import nonfinite_guarded
from attnlab.ops.softmax import softmax_attention_reference
from attnlab.ops.validation import (
    check_causal,
    check_causal_lengths,
    check_impl,
    check_qkv,
    check_scale,
    compute_dtype,
    expand_kv,
)
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["hip_attention", "hip_attention_reference", "hip_select_blocks", "hip_select_blocks_vectorized",
           "hip_mask"]

IMPLS = ("auto", "reference", "gather")


def _positive(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return value


def _check_options(k_budget: int, block_size_q: int, block_size_k: int, window: int,
                   sink_tokens: int, query_stride: int, causal: bool) -> None:
    check_causal(causal, causal_only="HiP attention")
    _positive("block_size_q", block_size_q, 1)
    _positive("block_size_k", block_size_k, 1)
    _positive("k_budget", k_budget, 1)
    _positive("window", window, 0)
    _positive("sink_tokens", sink_tokens, 0)
    _positive("query_stride", query_stride, 1)


def hip_select_blocks(q: torch.Tensor, k: torch.Tensor, *, k_budget: int = 512, block_size_q: int = 32,
                      block_size_k: int = 2, window: int = 128, query_stride: int = 2,
                      causal: bool = True) -> torch.Tensor:
    """The hierarchical top-k search of HiP (arXiv 2406.09827; v1.1 reference kernel).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]`` (queries aligned to the end of the keys).
        k_budget: keys selected per query block (``ceil(k_budget / block_size_k)`` blocks).
        block_size_q, block_size_k: query / key block sizes.
        window: the last ``window`` keys of the block's last query are not candidates
            (the window covers them).
        query_stride: every ``query_stride``-th query of a block scores the representatives.

    Returns:
        int64 ``[B, H, G, ceil(k_budget / block_size_k)]`` (``G = ceil(N / block_size_q)``): sorted start
        positions (in keys) of the selected key blocks of each query block, ``-1`` where fewer
        blocks exist.
    """
    _check_options(k_budget, block_size_q, block_size_k, window, 0, query_stride, causal)
    B, H, N, D = q.shape
    M = k.shape[2]
    check_causal_lengths(N, M)
    dtype = compute_dtype(q.dtype)
    kh = expand_kv(k, H).to(dtype)  # (B, H, M, D)
    K = -(-k_budget // block_size_k)  # key blocks kept (rounded up: k_budget >= M keeps every key)
    G = -(-N // block_size_q)
    result = torch.full((B, H, G, K), -1, dtype=torch.long, device=q.device)
    offsets = torch.arange(block_size_k, device=q.device)
    for g in range(G):
        first, stop = g * block_size_q, min(N, (g + 1) * block_size_q)
        candidates = stop + (M - N) - window  # keys [0, candidates)
        if candidates <= 0:
            continue
        blocks = -(-candidates // block_size_k)
        if blocks <= K:
            result[:, :, g, :blocks] = torch.arange(blocks, device=q.device) * block_size_k
            continue
        qs = q[:, :, first:stop:query_stride].to(dtype)  # (B, H, nq, D)

        def representative_score(block: torch.Tensor, qs: torch.Tensor = qs,
                                 candidates: int = candidates) -> torch.Tensor:  # (B, H, C) -> (B, H, C)
            pos = block[..., None] * block_size_k + offsets  # (B, H, C, block_size_k)
            valid = pos < candidates
            flat = pos.clamp(max=candidates - 1).reshape(B, H, -1)
            keys = torch.gather(kh, 2, flat[..., None].expand(-1, -1, -1, D))  # (B, H, C*bk, D)
            scores = torch.einsum("bhqd,bhkd->bhqk", qs, keys).reshape(B, H, -1, *pos.shape[2:])
            scores = scores.masked_fill(~valid[:, :, None], float("-inf"))  # (B, H, nq, C, bk)
            return scores.amax(dim=(2, 4))

        j = torch.arange(K + 1, device=q.device)
        bounds = (blocks * j) // K
        starts = bounds[:-1].expand(B, H, K).clone()  # (B, H, K) group starts, in blocks
        sizes = (bounds[1:] - bounds[:-1]).expand(B, H, K).clone()
        while int(sizes.max()) > 1:
            half = sizes // 2
            child_start = torch.cat([starts, starts + half], dim=-1)  # (B, H, 2K)
            child_size = torch.cat([half, sizes - half], dim=-1)
            score = representative_score(child_start).masked_fill(child_size == 0, float("-inf"))
            top = torch.topk(score, K, dim=-1).indices  # (B, H, K)
            starts, sizes = child_start.gather(-1, top), child_size.gather(-1, top)
        result[:, :, g] = starts.sort(dim=-1).values * block_size_k
    return result


_SEARCH_CHUNK = 16  # query blocks searched at once: O(chunk * k_budget * d) gathered keys


def hip_select_blocks_vectorized(q: torch.Tensor, k: torch.Tensor, *, k_budget: int = 512, block_size_q: int = 32,
                                 block_size_k: int = 2, window: int = 128, query_stride: int = 2,
                                 causal: bool = True) -> torch.Tensor:
    """:func:`hip_select_blocks` with every query block searched at once (chunks of query blocks).

    Same result (same scores, same ``torch.topk`` per group list). The query blocks differ only in
    how many candidate key blocks they have; a block whose groups are already single key blocks
    keeps them through the extra halving rounds of the others (the empty half scores ``-inf``, the
    other half is the group itself), so all run the same number of rounds, ``log2(M / k_budget)``.
    Cost: ``O(N / block_size_q * k_budget * log(M / k_budget) * d)``, in ``ceil(G / 32)`` chunks.
    """
    _check_options(k_budget, block_size_q, block_size_k, window, 0, query_stride, causal)
    B, H, N, D = q.shape
    M = k.shape[2]
    check_causal_lengths(N, M)
    dtype = compute_dtype(q.dtype)
    device = q.device
    # the search picks indices: nothing in it is differentiated, so no graph is recorded
    q, k = q.detach(), k.detach()
    kh = expand_kv(k, H).to(dtype).reshape(B * H * M, D)  # rows of every (batch, head)
    row0 = (torch.arange(B * H, device=device) * M).reshape(B, H, 1)  # first row of each (batch, head)
    bk, K, G = block_size_k, -(-k_budget // block_size_k), -(-N // block_size_q)
    ninf = float("-inf")
    stop = torch.clamp(torch.arange(1, G + 1, device=device) * block_size_q, max=N)  # (G,) last query + 1
    candidates = stop + (M - N) - window  # (G,) keys [0, candidates) per query block
    blocks = torch.div(candidates.clamp(min=0) + bk - 1, bk, rounding_mode="floor")  # (G,)
    # the strided queries of every block, padded: (B, H, G, nq, D) and which of them exist
    qp = torch.nn.functional.pad(q.to(dtype), (0, 0, 0, G * block_size_q - N))
    qs = qp.reshape(B, H, G, block_size_q, D)[:, :, :, ::query_stride]  # (B, H, G, nq, D)
    q_ok = (torch.arange(G * block_size_q, device=device).reshape(G, block_size_q)[:, ::query_stride] < N)
    qs = torch.where(q_ok[:, :, None], qs, qs[:, :, :, :1])  # past N (last block): its first query again
    offsets = torch.arange(bk, device=device)
    j = torch.arange(K + 1, device=device)
    result = torch.full((B, H, G, K), -1, dtype=torch.long, device=device)
    few = (blocks <= K)[:, None] & (j[None, :K] < blocks[:, None])  # (G, K) blocks <= K: keep them all
    result = torch.where(few, j[:K] * bk, result)
    searched = (blocks > K).nonzero().flatten()
    # one buffer for the gathered keys and one for their scores, reused by every round and chunk: fresh
    # tensors of this size (tens of MiB) cost more in page faults on CPU than the gather itself
    nq = qs.shape[-2]
    most = B * H * min(_SEARCH_CHUNK, searched.numel()) * 2 * K * bk  # rows of the first round of a chunk
    key_buffer, score_buffer = kh.new_empty(most, D), kh.new_empty(most * nq)
    for part in searched.split(_SEARCH_CHUNK) if searched.numel() else ():
        C = part.numel()
        cand, n_blocks = candidates[part], blocks[part]  # (C,)
        qc = qs[:, :, part].transpose(-1, -2).contiguous()  # (B, H, C, D, nq)
        bounds = (n_blocks[:, None] * j) // K  # (C, K + 1)
        starts = bounds[:, :-1].expand(B, H, C, K)  # (B, H, C, K) group starts, in key blocks
        sizes = (bounds[:, 1:] - bounds[:, :-1]).expand(B, H, C, K)

        def representative_score(block: torch.Tensor, C: int = C, cand: torch.Tensor = cand,
                                 qc: torch.Tensor = qc) -> torch.Tensor:
            """``max`` of ``q . k`` over the block's strided queries and the key block starting at ``block``
            (in key blocks): ``[B, H, C, X] -> [B, H, C, X]``. Keys past the candidates are replaced by the
            block's first key and missing queries by the block's first query (duplicates leave a max alone)."""
            X = block.shape[-1]
            pos = block[..., None] * bk + offsets  # (B, H, C, X, bk)
            pos = torch.where(pos < cand[:, None, None], pos, pos[..., :1])
            rows = B * H * C * X * bk
            keys = torch.index_select(kh, 0, (pos.reshape(B, H, -1) + row0).reshape(-1), out=key_buffer[:rows])
            scores = torch.matmul(keys.reshape(B, H, C, X * bk, D), qc,
                                  out=score_buffer[:rows * nq].reshape(B, H, C, X * bk, nq))  # (B, H, C, X*bk, nq)
            return scores.reshape(B, H, C, X, -1).amax(dim=-1)  # (B, H, C, X): max over the block's keys and queries

        kept_score = None  # the representative scores of the kept groups
        while int(sizes.max()) > 1:
            half = sizes // 2
            child_start = torch.cat([starts, starts + half], dim=-1)  # (B, H, C, 2K)
            child_size = torch.cat([half, sizes - half], dim=-1)
            # a group's first half starts where the group does: same representative, score known
            score = (representative_score(child_start) if kept_score is None else
                     torch.cat([kept_score, representative_score(starts + half)], dim=-1))  # (B, H, C, 2K)
            top = torch.topk(score.masked_fill(child_size == 0, ninf), K, dim=-1).indices  # (B, H, C, K)
            starts, sizes, kept_score = (x.gather(-1, top) for x in (child_start, child_size, score))
        result[:, :, part] = starts.sort(dim=-1).values * bk
    return result


def hip_mask(block_starts: torch.Tensor, length: int, key_length: int, *, block_size_q: int,
             block_size_k: int, window: int, sink_tokens: int) -> torch.Tensor:
    """Dense boolean ``[B, H, N, M]`` mask of HiP: causal AND (sink OR window OR selected block).

    Query ``i`` (position ``p = i + M - N``) sees key ``j <= p`` iff ``j < sink_tokens``,
    ``p - j < window`` or ``j`` lies in a key block selected for the query's block.
    """
    B, H, G, _ = block_starts.shape
    device = block_starts.device
    n_blocks = -(-key_length // block_size_k)
    chosen = torch.zeros(B, H, G, n_blocks + 1, dtype=torch.bool, device=device)
    slot = torch.where(block_starts >= 0, block_starts // block_size_k, n_blocks)  # -1 -> spare slot
    chosen.scatter_(-1, slot, True)
    j = torch.arange(key_length, device=device)
    in_block = chosen[..., :n_blocks][..., j // block_size_k]  # (B, H, G, M)
    rows = torch.arange(length, device=device) // block_size_q
    in_block = in_block[:, :, rows]  # (B, H, N, M)
    p = torch.arange(length, device=device)[:, None] + (key_length - length)
    causal = j[None, :] <= p
    local = (j[None, :] < sink_tokens) | (p - j[None, :] < window)
    return causal & (local | in_block)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_starts: torch.Tensor | None, *,
             k_budget: int, block_size_q: int, block_size_k: int, window: int, sink_tokens: int,
             query_stride: int, causal: bool, search: object = hip_select_blocks) -> torch.Tensor:
    sizes = check_qkv(q, k, v)
    _check_options(k_budget, block_size_q, block_size_k, window, sink_tokens, query_stride, causal)
    check_causal_lengths(sizes.length, sizes.key_length)
    if block_starts is None:
        return search(q, k, k_budget=k_budget, block_size_q=block_size_q, block_size_k=block_size_k,
                      window=window, query_stride=query_stride)
    G = -(-sizes.length // block_size_q)
    if not isinstance(block_starts, torch.Tensor) or block_starts.dtype != torch.long:
        raise TypeError(f"block_starts must be an int64 torch.Tensor, got {block_starts!r:.80}")
    if block_starts.ndim != 4 or tuple(block_starts.shape[:3]) != (sizes.batch, sizes.heads, G):
        raise ValueError(f"block_starts must have shape [B, H, G, K] = [{sizes.batch}, {sizes.heads}, {G}, K], "
                         f"got {tuple(block_starts.shape)}")
    bad = (block_starts >= sizes.key_length) | ((block_starts >= 0) & (block_starts % block_size_k != 0))
    if bool(bad.any()) or bool((block_starts < -1).any()):
        raise ValueError(f"block_starts must hold multiples of block_size_k={block_size_k} below "
                         f"M={sizes.key_length}, or -1")
    block_starts = block_starts.sort(dim=-1).values  # a block given twice counts once
    repeated = torch.zeros_like(block_starts, dtype=torch.bool)
    repeated[..., 1:] = block_starts[..., 1:] == block_starts[..., :-1]
    return block_starts.masked_fill(repeated, -1)


def hip_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_budget: int = 512,
                            block_size_q: int = 32, block_size_k: int = 2, window: int = 128,
                            sink_tokens: int = 4, causal: bool = True, scale: float | None = None,
                            query_stride: int = 2, block_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Dense masked softmax over :func:`hip_mask` of the selected blocks (quadratic; the oracle).

    HiP (arXiv 2406.09827): exact softmax over the union of the selected key blocks, the sliding
    window and the sink tokens.
    """
    block_starts = _prepare(q, k, v, block_starts, k_budget=k_budget, block_size_q=block_size_q,
                            block_size_k=block_size_k, window=window, sink_tokens=sink_tokens,
                            query_stride=query_stride, causal=causal)
    mask = hip_mask(block_starts, q.shape[2], k.shape[2], block_size_q=block_size_q, block_size_k=block_size_k,
                    window=window, sink_tokens=sink_tokens)  # (B, H, N, M)
    return softmax_attention_reference(q, k, v, scale=scale, attn_mask=mask)


def _gather_lists(block_starts: torch.Tensor, N: int, M: int, *, block_size_q: int, block_size_k: int,
                  window: int, sink_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: keys ``[B, H, G, S]`` (sinks, window span, selected blocks), mask ``[B, H, G, Bq, S]``."""
    B, H, G, K = block_starts.shape
    device = block_starts.device
    off = M - N
    Bq = block_size_q
    queries = torch.arange(G * Bq, device=device).reshape(G, Bq)  # (G, Bq)
    p = queries + off  # key-space positions
    sinks = torch.arange(sink_tokens, device=device).expand(G, sink_tokens)  # (G, sink)
    span = Bq + max(window - 1, 0)
    recent = (queries[:, :1] + off - max(window - 1, 0)) + torch.arange(span, device=device)  # (G, span)
    if window == 0:
        recent = recent[:, :0]
    blocks = (block_starts[..., None] + torch.arange(block_size_k, device=device)).reshape(B, H, G, -1)
    block_valid = (block_starts[..., None] >= 0).expand(B, H, G, K, block_size_k).reshape(B, H, G, -1)
    pq = p[None, None, :, :, None]  # (1, 1, G, Bq, 1)
    live = (queries < N)[None, None, :, :, None]
    sink_ok = (sinks[:, None, :] <= p[:, :, None]) & (sinks[:, None, :] < M)  # (G, Bq, sink)
    w = recent[:, None, :]
    window_ok = (w <= p[:, :, None]) & (p[:, :, None] - w < window) & (w >= sink_tokens) & (w >= 0)
    # a selected key b is seen by query p iff b + window <= p (outside the window, hence also causal):
    # one comparison over (B, H, G, Bq, K*bk); the per-key conditions stay at (B, H, G, 1, K*bk)
    key_ok = (block_valid & (blocks < M) & (blocks >= sink_tokens))[:, :, :, None, :]
    block_ok = key_ok & ((blocks + window)[:, :, :, None, :] <= pq)
    index = torch.cat([sinks.expand(B, H, G, -1), recent.expand(B, H, G, -1), blocks], dim=-1)
    allowed = torch.cat([sink_ok.expand(B, H, G, Bq, -1), window_ok.expand(B, H, G, Bq, -1), block_ok], dim=-1)
    return index.clamp(0, M - 1), allowed & live


@nonfinite_guarded
def hip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_budget: int = 512,
                  block_size_q: int = 32, block_size_k: int = 2, window: int = 128, sink_tokens: int = 4,
                  causal: bool = True, scale: float | None = None, query_stride: int = 2,
                  block_starts: torch.Tensor | None = None,
                  impl: Literal["auto", "reference", "gather"] = "auto") -> torch.Tensor:
    """HiP attention: hierarchical top-k key-block selection, then block-sparse softmax attention.

    Lee et al., HiP (ICLR 2025, arXiv 2406.09827), Algorithm 1 (hierarchical mask estimation) and
    block-sparse attention; defaults of the ICLR-era v1.0 GPU kernel (``mask_k=512, block_size_q=32,
    block_size_k=2, sliding_window_size=128``); sink tokens as in InfiniteHiP (arXiv 2502.08910).
    Training-free: a drop-in replacement of causal softmax attention.

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, M, D|Dv]``, ``N <= M`` (queries end-aligned).
        k_budget: keys selected per query block; ``k_budget >= M`` gives dense causal attention.
        block_size_q, block_size_k: query / key block sizes of the search.
        window: each query also sees its last ``window`` keys.
        sink_tokens: each query also sees the first ``sink_tokens`` keys.
        causal: must be True (HiP defines no bidirectional form).
        scale: default ``D ** -0.5``.
        query_stride: every ``query_stride``-th query of a block scores the representatives
            (v1.0 ``reduce_stride=2``).
        block_starts: skip the search and use these ``[B, H, G, K]`` block starts (``-1`` = none),
            as :func:`hip_select_blocks` returns.
        impl: "reference" (the search one query block at a time, then dense masked softmax) or
            "gather" (= "auto": the search vectorised over query blocks, then each query block gathers
            its sinks, window and selected blocks for one fused SDPA call:
            ``O(N (k_budget + window + block_size_q) d)`` time and memory).

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q.
    """
    check_impl(impl, IMPLS)
    options = dict(k_budget=k_budget, block_size_q=block_size_q, block_size_k=block_size_k,
                   window=window, sink_tokens=sink_tokens, causal=causal, scale=scale,
                   query_stride=query_stride, block_starts=block_starts)
    if impl == "reference":
        return hip_attention_reference(q, k, v, **options)
    block_starts = _prepare(q, k, v, block_starts, k_budget=k_budget, block_size_q=block_size_q,
                            block_size_k=block_size_k, window=window, sink_tokens=sink_tokens,
                            query_stride=query_stride, causal=causal, search=hip_select_blocks_vectorized)
    scale = check_scale(scale, q.shape[-1])
    H = q.shape[1]
    index, allowed = _gather_lists(block_starts, q.shape[2], k.shape[2], block_size_q=block_size_q,
                                   block_size_k=block_size_k, window=window,
                                   sink_tokens=sink_tokens)
    return gathered_block_attention(q, expand_kv(k, H), expand_kv(v, H), key_index=index, allowed=allowed,
                                    scale=scale)


register(Mechanism(
    name="hip",
    op=hip_attention,
    reference=hip_attention_reference,
    layer=None,
    family="sparse",
    paper="A Training-free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically "
          "Pruned Attention",
    arxiv="2406.09827",
    supports_causal=True,
    supports_bidirectional=False,
    supports_cross=True,
    supports_gqa=True,
    complexity="O(N k d + N k log(M / k) d / b_q)",
    # the speed benchmark runs HiP's own defaults (k_budget=512, window=128): the budget users get
    # block_size_q=1: a query's selection then depends on itself and earlier keys only (no look-ahead
    # through the shared block selection); block_size_q > 1 is tested in tests/test_hip.py.
    check=CheckConfig(options={"k_budget": 4, "block_size_q": 1, "block_size_k": 2, "window": 2,
                               "sink_tokens": 1},
                      bf16_options={"k_budget": 64, "block_size_q": 32, "block_size_k": 4, "window": 32,
                                    "sink_tokens": 4}),
))
