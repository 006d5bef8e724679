"""DMA: trainable dynamic mask sparse attention (Doge / flash-dmattn).

Shi et al., "Trainable Dynamic Mask Sparse Attention" (arXiv 2508.02124; code SmallDoges/flash-dmattn,
``dynamic_mask_attention_python`` of ``benchmarks/forward_equivalence.py``). A per-key additive bias
(computed by the layer from the values, see :class:`attnlab.nn.DynamicMaskAttention`) both shifts
the scores and chooses which keys each query keeps:

``S = scale Q K^T + bias``; each query keeps the ``k_budget`` allowed keys with the largest bias
(a top-k of the detached bias: the selection is not differentiated, the bias is);
``O = softmax(S masked to the kept keys) V``. Ties in the bias are broken towards the earlier key
(flash-dmattn's ``torch.topk`` leaves them unspecified; a fixed rule lets every path agree exactly).

The fast path (``impl="block"``) never builds an ``N x M`` tensor. The bias belongs to the keys, not
to the query, so the non-causal selection is one set shared by every query (one SDPA call over the
``k_budget`` kept keys), and a causal query's kept keys change only when a key enters the prefix:
for a block of queries starting at position ``s``, every key a query of the block keeps is among
the ``k_budget`` best keys before ``s`` or inside the block (a key outside the best ``k_budget`` of
``[0, s)`` already has ``k_budget`` better keys before every later query). So each block gathers
``k_budget + block`` candidate keys and ranks them per query: ``O(N (k_budget + block) d)`` time
and memory.
"""

from __future__ import annotations

from typing import Literal

import torch

from attnlab.ops.gathered_blocks import gathered_block_attention
from attnlab.ops.nonfinite import nonfinite_guarded
from attnlab.ops.softmax import attention_mask
from attnlab.ops.validation import (
    Sizes,
    check_causal,
    check_causal_lengths,
    check_impl,
    check_qkv,
    check_scale,
    check_tensor,
    compute_dtype,
    expand_kv,
)

__all__ = ["dynamic_mask_attention", "dynamic_mask_attention_reference", "dynamic_mask_select",
           "dynamic_mask_block_candidates"]

IMPLS = ("auto", "reference", "gather", "block")
_QUERY_CHUNK = 256  # queries whose top-k is computed at once: O(chunk * M) memory


def _check(sizes: Sizes, key_bias: torch.Tensor, k_budget: int, causal: bool) -> torch.Tensor:
    B, H, Hkv, N, M, _, _ = sizes
    check_tensor("key_bias", key_bias, ndim=3, layout="[B, H_kv, M]")
    if key_bias.shape[0] not in (1, B) or key_bias.shape[1] not in (1, Hkv) or key_bias.shape[2] != M:
        raise ValueError(f"key_bias must have shape [B, H_kv, M] = [{B}, {Hkv}, {M}] (size-1 B or H_kv "
                         f"broadcast), got {tuple(key_bias.shape)}")
    if isinstance(k_budget, bool) or not isinstance(k_budget, int):
        raise TypeError(f"k_budget must be an int, got {type(k_budget).__name__}")
    if k_budget < 1:
        raise ValueError(f"k_budget must be >= 1, got k_budget={k_budget}")
    if causal:
        check_causal_lengths(N, M)
    return key_bias.expand(B, Hkv, M)


def _ranked(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest entries along the last dim, ties to the earlier position.

    A stable descending sort keeps equal values in position order; ``-inf`` entries (not allowed)
    come last.
    """
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def dynamic_mask_select(key_bias: torch.Tensor, length: int, *, k_budget: int, causal: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the keys each query keeps: the ``k_budget`` allowed keys of largest bias.

    Args:
        key_bias: ``[B, H_kv, M]`` (only its values are used; no gradient).
        length: N queries (causal: aligned to the end of the keys, query ``i`` may see ``j <= i + M - N``).

    Returns:
        ``index [B, H_kv, N, W]`` int64 and ``kept [B, H_kv, N, W]`` bool with ``W = min(k_budget, M)``;
        ``kept`` is False where a causal query has fewer than ``W`` allowed keys.
    """
    B, Hkv, M = key_bias.shape
    W = min(k_budget, M)
    bias = key_bias.detach()
    index, kept = [], []
    for start in range(0, length, _QUERY_CHUNK):
        stop = min(length, start + _QUERY_CHUNK)
        scores = bias[:, :, None, :].expand(B, Hkv, stop - start, M)  # (B, H_kv, C, M)
        if causal:
            i = torch.arange(start, stop, device=bias.device)[:, None] + (M - length)
            j = torch.arange(M, device=bias.device)[None, :]
            scores = scores.masked_fill(j > i, float("-inf"))
        chosen = _ranked(scores, W)  # (B, H_kv, C, W)
        index.append(chosen)
        kept.append(scores.gather(-1, chosen) > float("-inf"))
    return torch.cat(index, dim=2), torch.cat(kept, dim=2)


def dynamic_mask_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                     key_bias: torch.Tensor, k_budget: int, causal: bool = False,
                                     scale: float | None = None) -> torch.Tensor:
    """Dense transcription of ``dynamic_mask_attention_python`` (flash-dmattn; arXiv 2508.02124).

    ``bias' = detach(bias)`` masked to ``-inf`` outside the causal mask; if ``M > k_budget`` keep
    the top-``k_budget`` entries of ``bias'`` per query (excluding ``-inf`` ones; ties to the
    earlier key); scores
    ``scale Q K^T + bias`` masked to the kept keys; softmax; times V.
    """
    check_causal(causal)
    sizes = check_qkv(q, k, v)
    B, H, Hkv, N, M, D, _ = sizes
    scale = check_scale(scale, D)
    key_bias = _check(sizes, key_bias, k_budget, causal)
    dtype = compute_dtype(q.dtype)
    bias = expand_kv(key_bias[..., None], H)[..., 0].to(dtype)[:, :, None, :]  # (B, H, 1, M)
    allowed = attention_mask(N, M, causal=causal, device=q.device)  # (N, M) or None
    allowed = torch.ones(N, M, dtype=torch.bool, device=q.device) if allowed is None else allowed
    allowed = allowed.expand(B, H, N, M)
    if M > k_budget:
        masked = bias.detach().expand(B, H, N, M).masked_fill(~allowed, float("-inf"))
        top = _ranked(masked, k_budget)  # (B, H, N, k_budget); ties to the earlier key
        keep = torch.zeros(B, H, N, M, dtype=torch.bool, device=q.device)
        keep.scatter_(-1, top, masked.gather(-1, top) > float("-inf"))
        allowed = keep
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(dtype), expand_kv(k, H).to(dtype)) * scale + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H, N, M)
    return torch.einsum("bhnm,bhme->bhne", probs, expand_kv(v, H).to(dtype)).to(q.dtype)


def _default_block(k_budget: int) -> int:
    """Queries per block of the "block" path: half the budget, in [16, 128].

    Every query of a block scores ``k_budget + block`` candidates to use ``k_budget``: a larger
    block means fewer, larger SDPA blocks but more wasted candidates.
    """
    return min(128, max(16, k_budget // 2))


def dynamic_mask_block_candidates(key_bias: torch.Tensor, length: int, *, k_budget: int, block: int,
                                  causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate keys per block of queries and which of them each query keeps (DMA, arXiv 2508.02124).

    Args:
        key_bias: ``[B, H_kv, M]`` (only its values are used; no gradient).
        length: N queries (causal: aligned to the end of the keys).
        block: queries per block (causal); non-causal uses one block of all N queries.

    Returns:
        ``index [B, H_kv, G, S]`` int64 (entries in ``[0, M)``) and ``kept [B, H_kv, G, Bq, S]`` bool:
        query ``g * Bq + r`` keeps ``index[..., g, s]`` iff ``kept[..., g, r, s]``. Non-causal:
        ``G = 1``, ``Bq = N``, ``S = min(k_budget, M)``; causal: ``G = ceil(N / block)``, ``Bq = block``,
        ``S = min(k_budget, M) + block``.
    """
    B, Hkv, M = key_bias.shape
    W = min(k_budget, M)
    bias = key_bias.detach()
    device = bias.device
    if not causal:
        index = _ranked(bias, W)[:, :, None]  # (B, H_kv, 1, W): one set for every query
        return index, torch.ones(1, 1, 1, 1, W, dtype=torch.bool, device=device).expand(B, Hkv, 1, length, W)
    off, G = M - length, -(-length // block)
    ninf = float("-inf")
    # best W keys of the prefix before each block, kept in key order (so that stable sorts of the
    # candidates break ties towards the earlier key); empty slots: index M, value -inf
    top_index = torch.full((B, Hkv, W), M, dtype=torch.long, device=device)
    top_value = torch.full((B, Hkv, W), ninf, dtype=bias.dtype, device=device)
    if off > 0:
        n = min(W, off)
        chosen = _ranked(bias[:, :, :off], n).sort(dim=-1).values  # (B, H_kv, n) in key order
        top_index[..., :n], top_value[..., :n] = chosen, bias.gather(-1, chosen)
    padded = torch.nn.functional.pad(bias, (0, G * block - length), value=ninf)  # (B, H_kv, M + pad)
    positions = torch.arange(M + G * block - length, device=device)
    cand_index, cand_value = [], []
    for g in range(G):
        s = off + g * block
        index = torch.cat([top_index, positions[s:s + block].expand(B, Hkv, block)], dim=-1)  # (B, H_kv, S)
        value = torch.cat([top_value, padded[..., s:s + block]], dim=-1)
        cand_index.append(index)
        cand_value.append(value)
        best = _ranked(value, W)
        top_index = index.gather(-1, best)
        top_value = value.gather(-1, best)
        order = top_index.argsort(dim=-1)  # back to key order
        top_index, top_value = top_index.gather(-1, order), top_value.gather(-1, order)
    index = torch.stack(cand_index, dim=2)  # (B, H_kv, G, S)
    value = torch.stack(cand_value, dim=2)
    order = torch.sort(value, dim=-1, descending=True, stable=True).indices
    index = index.gather(-1, order)  # candidates best first (ties: earlier key first)
    cutoff = _rank_cutoffs(order, index, W=W, block=block, M=M)  # (B, H_kv, G, Bq)
    p = off + torch.arange(G * block, device=device).reshape(G, block)  # (G, Bq) query positions
    S = index.shape[-1]
    # query r of block g keeps the candidates it sees (key <= its position) ranked at or above its cutoff
    kept = (index[:, :, :, None, :] <= p[:, :, None]) & (torch.arange(S, device=device) <= cutoff[..., None])
    return index.clamp(max=M - 1), kept  # (B, H_kv, G, S), (B, H_kv, G, Bq, S)


def _rank_cutoffs(order: torch.Tensor, index: torch.Tensor, *, W: int, block: int, M: int) -> torch.Tensor:
    """Per query of each block, the sorted position of the worst key it keeps (``S`` = keeps all it sees).

    ``order [B, H_kv, G, S]`` sorts the candidates (the ``W`` prefix slots, then the block's keys in
    order) best first; ``index`` is the sorted candidates' keys. The visible set grows by one key
    per query, so the cutoff follows the eviction rule: while fewer than ``W`` keys are visible,
    all are kept; once ``W`` are, a new key ranked above the cutoff evicts the cutoff's key and
    the cutoff moves to the next visible position above it (the best earlier prefix slot or
    already entered block key below the old cutoff). ``block`` steps over ``[B, H_kv, G, block]``
    tensors: ``O(N block)`` work, instead of a cumulative count over every ``(query, candidate)`` pair.
    """
    B, Hkv, G, S = order.shape
    device = order.device
    positions = torch.arange(S, device=device)
    rank = torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))  # candidate -> sorted position
    entering = rank[..., S - block:]  # (B, H_kv, G, Bq): sorted position of the block's r-th key
    prefix = (positions < S - block)  # unsorted slots 0 .. W-1 hold the prefix's best keys
    is_prefix = prefix.gather(-1, order.flatten()).reshape(order.shape) & (index < M)  # sorted, valid prefix key
    marked = torch.where(is_prefix, positions, -1)  # (B, H_kv, G, S)
    best_prefix_below = torch.cat([marked.new_full((B, Hkv, G, 1), -1), marked.cummax(dim=-1).values[..., :-1]],
                                  dim=-1)  # the largest prefix position strictly below each position
    n_prefix = is_prefix.sum(dim=-1)  # (B, H_kv, G)
    last_prefix = marked.amax(dim=-1)
    cutoff = torch.where(n_prefix >= W, last_prefix, S)  # (B, H_kv, G) before the block's first key enters
    seen_max = torch.full((B, Hkv, G), -1, dtype=torch.long, device=device)
    cutoffs = []
    for r in range(block):
        t = entering[..., r]
        seen_max = torch.maximum(seen_max, t)
        before = n_prefix + r  # keys visible before this query's own key enters
        filling = torch.where(before + 1 >= W, torch.maximum(last_prefix, seen_max), S)
        entered = entering[..., :r + 1]
        below = torch.where(entered < cutoff[..., None], entered, -1).amax(dim=-1)
        previous = torch.maximum(best_prefix_below.gather(-1, cutoff.clamp(max=S - 1)[..., None])[..., 0], below)
        full = torch.where(t < cutoff, previous, cutoff)
        cutoff = torch.where(before >= W, full, filling)
        cutoffs.append(cutoff)
    return torch.stack(cutoffs, dim=-1)  # (B, H_kv, G, Bq)


@nonfinite_guarded
def dynamic_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_bias: torch.Tensor,
                           k_budget: int, causal: bool = False, scale: float | None = None,
                           impl: Literal["auto", "reference", "gather", "block"] = "auto") -> torch.Tensor:
    """Dynamic mask attention (DMA): per-key bias added to the scores and choosing the kept keys.

    Shi et al., "Trainable Dynamic Mask Sparse Attention", arXiv 2508.02124 (flash-dmattn's
    ``dynamic_mask_attention_python``; mask type "topk").

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]``.
        key_bias: ``[B, H_kv, M]`` additive bias per key (size-1 ``B`` / ``H_kv`` broadcast); query head
            ``h`` uses kv head ``h // (H // H_kv)``; gradients flow to it through the scores.
        k_budget: keys kept per query (the ``k_budget`` allowed keys of largest bias; all of
            them when ``M <= k_budget``). Ties are broken by ``torch.topk``.
        causal: query ``i`` may see keys ``j <= i + M - N`` (queries aligned to the end of the keys).
        scale: default ``D ** -0.5``.
        impl: "reference" (dense ``N x M`` scores), "gather" (per query, gathers its kept keys:
            ``O(N * k_budget * d)`` memory, top-k over all keys in chunks of queries: ``O(N M)`` time),
            "block" (blocks of queries over ``k_budget + block`` gathered candidate keys, one SDPA
            call: ``O(N * k_budget * d)`` time, nothing of size ``N x M``; see the module docstring)
            or "auto" (= "block").

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q.
    """
    check_causal(causal)
    check_impl(impl, IMPLS)
    if impl == "reference":
        return dynamic_mask_attention_reference(q, k, v, key_bias=key_bias, k_budget=k_budget,
                                                causal=causal, scale=scale)
    sizes = check_qkv(q, k, v)
    scale = check_scale(scale, sizes.head_dim)
    key_bias = _check(sizes, key_bias, k_budget, causal)
    if impl in ("auto", "block"):
        index, kept = dynamic_mask_block_candidates(key_bias, sizes.length, k_budget=k_budget,
                                                    block=_default_block(k_budget), causal=causal)
        return gathered_block_attention(q, k, v, key_index=index, allowed=kept, scale=scale, key_bias=key_bias)
    index, kept = dynamic_mask_select(key_bias, sizes.length, k_budget=k_budget, causal=causal)
    # one query per block: key_index [B, H_kv, N, W], allowed [B, H_kv, N, 1, W]
    return gathered_block_attention(q, k, v, key_index=index, allowed=kept[:, :, :, None, :], scale=scale,
                                    key_bias=key_bias)
