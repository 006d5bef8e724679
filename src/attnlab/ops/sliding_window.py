"""Sliding-window (local) attention, and the gathered block attention the local/sparse ops share.

Sliding-window attention as used by Longformer (Beltagy et al., "Longformer: The Long-Document
Transformer", arXiv 2004.05150, sec. 3.1) and Mistral: softmax attention restricted to a band.

- causal: key ``j`` is visible to query ``i`` iff ``0 <= i - j < window``;
- non-causal: iff ``|i - j| <= window // 2``;
- causal with ``sink_tokens = s`` (StreamingLLM: Xiao et al., "Efficient Streaming Language Models
  with Attention Sinks", arXiv 2309.17453, sec. 3.2): the first ``s`` keys are visible to every
  query at or after them as well (``j < s`` and ``j <= i``).

The fast path (:func:`attnlab.ops.gathered_blocks.gathered_block_attention`) processes the queries in blocks of ``Bq``
consecutive positions; each block gathers only the keys its queries may see (a span of
``Bq + window - 1`` keys here), so memory is ``O(N * window)`` instead of ``O(N^2)``, and autograd
gives the backward pass. Neighborhood, dynamic-mask and HiP attention reuse the same helper with
their own key lists and masks. ``impl="flex"`` runs the same band as the ``mask_mod`` of compiled
FlexAttention (:mod:`attnlab.ops.flex`); "auto" picks it on CUDA.
"""

from __future__ import annotations

from typing import Literal

import torch

from attnlab.ops.flex import auto_uses_flex, flex_masked_attention
from attnlab.ops.gathered_blocks import gathered_block_attention
from attnlab.ops.nonfinite import Reach, guard_nonfinite, window_reach
from attnlab.ops.softmax import softmax_attention_reference
from attnlab.ops.validation import check_causal, check_impl, check_int, check_qkv, check_scale
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = [
    "sliding_window_attention",
    "sliding_window_attention_reference",
    "sliding_window_mask",
]

IMPLS = ("auto", "reference", "gather", "flex")


def _check_window(window: object) -> int:
    return check_int("window", window, minimum=1)


def _check_self(N: int, M: int, name: str) -> None:
    if N != M:
        raise ValueError(f"{name} is self-attention: k, v must have the length of q (N={N}), got M={M}")


def _check_sinks(sink_tokens: object, causal: bool) -> int:
    check_int("sink_tokens", sink_tokens, minimum=0)
    if sink_tokens and not causal:
        raise ValueError(f"sink_tokens={sink_tokens} needs causal=True: attention sinks (StreamingLLM) are "
                         "defined for causal attention only; pass sink_tokens=0 for a bidirectional window")
    return sink_tokens


def sliding_window_mask(length: int, window: int, *, causal: bool = False, sink_tokens: int = 0,
                        key_length: int | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``[N, M]`` band mask (True = attend); ``M = key_length`` (default ``N``).

    causal: ``0 <= p - j < window`` or (``j < sink_tokens`` and ``j <= p``), where ``p = i + M - N`` is
    the position of query ``i`` (queries aligned to the end of the keys, as when decoding with a
    cache); non-causal (``N == M`` only): ``|i - j| <= window // 2``.
    """
    window = _check_window(window)
    sink_tokens = _check_sinks(sink_tokens, causal)
    key_length = length if key_length is None else key_length
    if key_length != length and not (causal and key_length > length):
        raise ValueError(f"key_length={key_length} differs from length={length}: only causal masks with "
                         "key_length > length (queries aligned to the end of the keys) are defined")
    i = torch.arange(length, device=device)[:, None] + (key_length - length)  # (N, 1) query positions
    j = torch.arange(key_length, device=device)[None, :]  # (1, M)
    return _band(i, j, window, causal) | _sinks(i, j, sink_tokens)


def _band(i: torch.Tensor, j: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    if causal:
        return (i - j >= 0) & (i - j < window)
    return (i - j).abs() <= window // 2


def _sinks(i: torch.Tensor, j: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """Sink keys of causal queries: ``j < sink_tokens`` and ``j <= i`` (True also inside the band)."""
    return (j < sink_tokens) & (j <= i)


def sliding_window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                                       causal: bool = False, sink_tokens: int = 0,
                                       scale: float | None = None) -> torch.Tensor:
    """Dense masked softmax ``softmax(scale Q K^T + log(band)) V`` (quadratic; the oracle).

    Longformer (arXiv 2004.05150) sec. 3.1 sliding window, with StreamingLLM's attention sinks
    (arXiv 2309.17453) when ``sink_tokens > 0``; band as in :func:`sliding_window_mask`.
    """
    check_causal(causal)
    sizes = check_qkv(q, k, v)
    _check_self(sizes.length, sizes.key_length, "sliding_window_attention")
    mask = sliding_window_mask(sizes.length, window, causal=causal, sink_tokens=sink_tokens,
                               device=q.device)  # (N, N)
    return softmax_attention_reference(q, k, v, scale=scale, attn_mask=mask)


def _block_size(window: int, length: int) -> int:
    return max(1, min(length, max(32, min(128, window))))


def _band_blocks(length: int, window: int, causal: bool, device: torch.device, sink_tokens: int = 0,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key spans and masks of the query blocks: ``key_index [G, S]``, ``allowed [G, Bq, S]``.

    With ``sink_tokens`` the first ``sink_tokens`` keys lead every span; a sink is allowed there only
    where the band does not already hold it (each key at most once per query row).
    """
    Bq = _block_size(window, length)
    G = -(-length // Bq)
    before, after = (window - 1, 0) if causal else (window // 2, window // 2)
    S = Bq + before + after
    starts = torch.arange(G, device=device) * Bq - before  # (G,)
    keys = starts[:, None] + torch.arange(S, device=device)  # (G, S) raw key positions
    queries = (torch.arange(G, device=device) * Bq)[:, None] + torch.arange(Bq, device=device)  # (G, Bq)
    valid = (keys >= 0) & (keys < length)
    allowed = _band(queries[:, :, None], keys[:, None, :], window, causal) & valid[:, None, :]
    if sink_tokens:
        sinks = torch.arange(min(sink_tokens, length), device=device).expand(G, -1)  # (G, s)
        qi, sj = queries[:, :, None], sinks[:, None, :]
        sink_ok = _sinks(qi, sj, sink_tokens) & ~_band(qi, sj, window, causal)  # (G, Bq, s)
        keys = torch.cat([sinks, keys], dim=1)
        allowed = torch.cat([sink_ok, allowed], dim=2)
    allowed &= (queries < length)[:, :, None]
    return keys.clamp(0, length - 1), allowed


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool, sink_tokens: int,
          scale: float) -> torch.Tensor:
    """Compiled FlexAttention with the band of :func:`sliding_window_mask` as its mask_mod."""

    def band_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        if sink_tokens:
            return _band(q_idx, kv_idx, window, causal) | _sinks(q_idx, kv_idx, sink_tokens)
        return _band(q_idx, kv_idx, window, causal)

    key = ("sliding_window", window, causal, sink_tokens)
    return flex_masked_attention(q, k, v, mask_mod=band_mask, mask_key=key, scale=scale)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int,
                             causal: bool = False, sink_tokens: int = 0, scale: float | None = None,
                             impl: Literal["auto", "reference", "gather", "flex"] = "auto") -> torch.Tensor:
    """Sliding-window softmax attention (self-attention, ``N == M``).

    Longformer, "The Long-Document Transformer" (Beltagy, Peters, Cohan, arXiv 2004.05150),
    sec. 3.1: each token attends to a fixed window around it. With ``sink_tokens`` (causal only),
    StreamingLLM's attention sinks (Xiao et al., "Efficient Streaming Language Models with Attention
    Sinks", arXiv 2309.17453): the first tokens stay visible to every later query.

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, N, D|Dv]`` (``H_kv`` divides ``H``).
        window: causal: key ``j`` visible to query ``i`` iff ``0 <= i - j < window``;
            non-causal: iff ``|i - j| <= window // 2``.
        causal: see ``window``.
        sink_tokens: causal only: keys ``j < sink_tokens`` are visible to every query ``i >= j``
            as well (0 = none).
        scale: default ``D ** -0.5``.
        impl: "reference" (dense masked softmax, ``O(N^2)``), "gather" (query blocks gather their
            key span: ``O(N * window)`` memory in gathered copies, differentiable), "flex"
            (``torch.nn.attention.flex_attention`` compiled, the band as its ``mask_mod`` with a cached
            block mask, see :mod:`attnlab.ops.flex`: fused; forward and backward on CUDA, forward only
            on CPU, where it raises ``NotImplementedError`` when a gradient is needed) or "auto"
            ("flex" on CUDA for float32/bfloat16/float16, where the gathered copies of "gather" cost
            ``(Bq + window - 1) / Bq`` times the keys and values; "gather" otherwise: on CPU compiled
            FlexAttention has no backward and compiles for seconds, float64 is for checks).

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q.
    """
    check_causal(causal)
    check_impl(impl, IMPLS)
    if impl == "reference":
        return guard_nonfinite(lambda k, v: sliding_window_attention_reference(
            q, k, v, window=window, causal=causal, sink_tokens=sink_tokens, scale=scale),
            q, k, v, reach=lambda bad: _window_reach(window, causal, sink_tokens)(bad))  # options checked by then
    sizes = check_qkv(q, k, v)
    _check_self(sizes.length, sizes.key_length, "sliding_window_attention")
    window = _check_window(window)
    sink_tokens = _check_sinks(sink_tokens, causal)
    scale = check_scale(scale, sizes.head_dim)
    # a window longer than the sequence sees what the whole sequence gives (no larger key spans to build)
    window = min(window, 2 * sizes.length)
    if impl == "auto":
        impl = "flex" if auto_uses_flex(q) else "gather"
    if impl == "flex":
        return guard_nonfinite(lambda k, v: _flex(q, k, v, window, causal, sink_tokens, scale), q, k, v,
                               reach=_window_reach(window, causal, sink_tokens))
    key_index, allowed = _band_blocks(sizes.length, window, causal, q.device, sink_tokens)
    return guard_nonfinite(lambda k, v: gathered_block_attention(q, k, v, key_index=key_index, allowed=allowed,
                                                                 scale=scale),
                           q, k, v, reach=_window_reach(window, causal, sink_tokens))


def _window_reach(window: int, causal: bool, sink_tokens: int) -> Reach:
    """The band of :func:`sliding_window_mask` as a reach (called only on validated options)."""
    if causal:
        return window_reach(window - 1, 0, sink_tokens=sink_tokens)
    return window_reach(window // 2, window // 2)


register(Mechanism(
    name="sliding_window",
    op=sliding_window_attention,
    reference=sliding_window_attention_reference,
    layer=None,
    family="local",
    paper="Longformer: The Long-Document Transformer",
    arxiv="2004.05150",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=False,
    supports_gqa=True,
    complexity="O(N w d)",
    # models compare local mechanisms at a quarter of their length, at least 2 keys (neither the tiny test
    # window nor the whole sequence); the benchmark at Mistral-like 128 keys, so the cost stays linear in N
    model_options=lambda seq_len: {"window": max(2, seq_len // 4)},
    bench_options=lambda shape: {"window": min(128, shape.length)},
    check=CheckConfig(options={"window": 4}, bf16_options={"window": 64}, gradcheck_length=6),
))
