"""The attention function attnlab registers with transformers' ``AttentionInterface``.

transformers calls ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``
with ``query [B, H, N, D]``, ``key, value [B, H_kv, M, D]`` (``M > N`` when a KV cache holds earlier
tokens: the queries are the LAST ``N`` positions) and expects ``(out [B, N, H, D], weights or None)``.
The mask is the boolean ``[B, 1, N, M]`` mask of ``masking_utils.sdpa_mask`` (True = attend; the
same mask function is registered under the attnlab name in ``AttentionMaskInterface``, otherwise
transformers would drop the causal and padding masks), or ``None`` when no token is padded and
the plain causal (or full) pattern applies.

How each case is computed (exactly, never approximately):

- ``softmax``: :func:`attnlab.ops.softmax_attention` (PyTorch SDPA) with the model's mask.
- other mechanisms, no padding: the op on the whole batch; queries shorter than the keys (decoding)
  go to HiP natively (it aligns queries to the end of the keys) and, for the local windows, to a
  softmax over the keys the window shows the last queries (at most ``window + sink_tokens``).
- other mechanisms, padded batch: each sequence is run alone on its real tokens (so the window,
  the sinks and HiP's blocks count real tokens only); padded query rows return zeros. The mask
  must then be the model's causal (or full) pattern over the real tokens; any other mask (a
  model's own sliding window, packed sequences) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from attnlab.ops.hip import hip_attention, hip_mask, hip_select_blocks
from attnlab.ops.neighborhood import neighborhood_attention, neighborhood_mask
from attnlab.ops.sliding_window import sliding_window_attention, sliding_window_mask
from attnlab.ops.softmax import softmax_attention

__all__ = ["attnlab_attention_function", "KeysAttended", "record_keys_attended", "SETTING_ATTRIBUTE"]

# Attribute set by attnlab.hf.use on attention modules: (implementation name, mechanism, options).
SETTING_ATTRIBUTE = "_attnlab_setting"


@dataclass
class KeysAttended:
    """The mean number of keys a query attends in the first attention layer, one entry per forward pass.

    Filled inside :func:`record_keys_attended`; the entries are weighted by their number of queries.
    """

    means: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def mean(self) -> float:
        total = sum(self.counts)
        return sum(m * c for m, c in zip(self.means, self.counts, strict=True)) / total if total else float("nan")


_RECORDER: list[KeysAttended] = []


@contextmanager
def record_keys_attended() -> Iterator[KeysAttended]:
    """Within the block, every prefill of the first attention layer appends its mean keys per query."""
    recorder = KeysAttended()
    _RECORDER.append(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.remove(recorder)


def _record(module: torch.nn.Module, mechanism: str, q: torch.Tensor, k: torch.Tensor, causal: bool,
            options: dict[str, Any]) -> None:
    if not _RECORDER or getattr(module, "layer_idx", 0) not in (0, None):
        return
    recorder = _RECORDER[-1]
    N, M = q.shape[2], k.shape[2]
    p = torch.arange(N) + (M - N)  # (N,) query positions
    if mechanism == "softmax":
        count = (p + 1).float() if causal else torch.full((N,), float(M))
    elif mechanism == "hip":
        hip = {name: options[name] for name in ("k_budget", "block_size_q", "block_size_k", "window",
                                                "query_stride") if name in options}
        starts = hip_select_blocks(q, k, **hip)
        mask = hip_mask(starts, N, M, block_size_q=hip.get("block_size_q", 32),
                        block_size_k=hip.get("block_size_k", 2), window=hip.get("window", 128),
                        sink_tokens=options.get("sink_tokens", 4))  # (B, H, N, M)
        count = mask.sum(-1).float().mean(dim=(0, 1))
    else:
        count = _local_mask(mechanism, N, M, causal, options, device=torch.device("cpu")).sum(-1).float()
    recorder.means.append(float(count.mean()))
    recorder.counts.append(N)


def _local_mask(mechanism: str, N: int, M: int, causal: bool, options: dict[str, Any],
                device: torch.device) -> torch.Tensor:
    """Boolean ``[N, M]`` mask of a local mechanism (end-aligned queries when ``N < M``)."""
    if mechanism == "sliding_window":
        return sliding_window_mask(N, options["window"], causal=causal, sink_tokens=options.get("sink_tokens", 0),
                                   key_length=M, device=device)
    if causal:  # 1-D causal neighbourhood, stride 1, dilation 1: the last kernel_size keys
        return sliding_window_mask(N, options["kernel_size"], causal=True, key_length=M, device=device)
    return neighborhood_mask((N,), options["kernel_size"]).to(device)


def _end_aligned_local(mechanism: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                       options: dict[str, Any]) -> torch.Tensor:
    """Causal local attention of the last ``N`` positions over ``M > N`` keys: softmax over the keys
    the window and the sinks show them (only those keys are gathered: ``O(window)`` per decoded token)."""
    N, M = q.shape[2], k.shape[2]
    mask = _local_mask(mechanism, N, M, True, options, device=q.device)  # (N, M)
    visible = mask.any(dim=0).nonzero().squeeze(1)  # (S,) keys some query sees
    return softmax_attention(q, k[:, :, visible], v[:, :, visible], attn_mask=mask[:, visible], scale=scale)


def _unpadded(mechanism: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
              options: dict[str, Any], module: torch.nn.Module) -> torch.Tensor:
    """The mechanism on sequences without padding: ``q [B, H, N, D]``, ``k, v [B, H_kv, M, D]`` -> ``[B, H, N, D]``."""
    N, M = q.shape[2], k.shape[2]
    if N > M:
        raise ValueError(f"the attention got {N} queries but only {M} keys")
    if M > N and not causal:
        raise NotImplementedError(f"bidirectional attention with {N} queries over {M} cached keys is not defined "
                                  "for the attnlab mechanisms")
    _record(module, mechanism, q, k, causal, options)
    if mechanism == "softmax":
        return softmax_attention(q, k, v, causal=causal, scale=scale, **options)
    if mechanism == "hip":
        return hip_attention(q, k, v, causal=True, scale=scale, **options)
    if M > N:
        return _end_aligned_local(mechanism, q, k, v, scale=scale, options=options)
    if mechanism == "sliding_window":
        return sliding_window_attention(q, k, v, causal=causal, scale=scale, **options)
    if mechanism == "neighborhood":
        kernel, rest = options["kernel_size"], {n: o for n, o in options.items() if n != "kernel_size"}
        if 2 <= kernel <= N:
            return neighborhood_attention(q, k, v, kernel_size=kernel, causal=causal, scale=scale, **rest)
        # NATTEN needs 2 <= kernel_size <= N; a kernel covering the sequence sees all of it (non-causal)
        # or the last kernel_size keys (causal: the same rule as a causal sliding window)
        if causal:
            return sliding_window_attention(q, k, v, window=kernel, causal=True, scale=scale, **rest)
        return softmax_attention(q, k, v, scale=scale)
    raise ValueError(f"mechanism {mechanism!r} has no Hugging Face attention path")


def _allowed(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, N, M]`` (True = attend) from the model's ``[B, 1, N, M]`` boolean or additive mask."""
    if attention_mask.ndim != 4 or attention_mask.shape[1] != 1:
        raise NotImplementedError(f"attention_mask of shape {tuple(attention_mask.shape)}: the attnlab mechanisms "
                                  "take a [B, 1, N, M] mask shared by the heads")
    if attention_mask.dtype == torch.bool:
        return attention_mask[:, 0]
    allowed = attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2
    if bool((attention_mask[:, 0][allowed] != 0).any()):
        raise NotImplementedError("attention_mask carries an additive bias: the attnlab mechanisms take a "
                                  "boolean mask (causal and padding) only")
    return allowed


def _padded(mechanism: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, *,
            causal: bool, scale: float, options: dict[str, Any], module: torch.nn.Module) -> torch.Tensor:
    """Each sequence of a padded batch alone on its real tokens; padded query rows are zeros."""
    B, H, N, _ = q.shape
    M = k.shape[2]
    key_real = allowed.any(dim=1)  # (B, M): a real key is seen by some query
    pattern = key_real[:, None, :].expand(B, N, M)
    if causal:
        p = torch.arange(N, device=q.device)[:, None] + (M - N)
        pattern = pattern & (torch.arange(M, device=q.device)[None, :] <= p)
    if not torch.equal(allowed, pattern):
        raise NotImplementedError(f"the model's attention mask is not the plain {'causal' if causal else 'full'} "
                                  "pattern over its real (unpadded) tokens (a model-side sliding window, chunked or "
                                  f"packed sequences?); attnlab mechanism {mechanism!r} cannot combine with it")
    if bool(key_real.all()):  # nothing padded (e.g. a prefill after earlier tokens): the whole batch at once
        return _unpadded(mechanism, q, k, v, causal=causal, scale=scale, options=options, module=module)
    out = q.new_zeros(B, H, N, v.shape[-1])
    rows = torch.arange(N, device=q.device) + (M - N)  # key index of each query
    for b in range(B):
        keys = key_real[b].nonzero().squeeze(1)  # (M_b,)
        queries = key_real[b, rows].nonzero().squeeze(1)  # (N_b,)
        if queries.numel() == 0:
            continue
        rank = key_real[b].cumsum(0)[rows[queries]] - 1  # position of each real query among the real keys
        if not torch.equal(rank, torch.arange(keys.numel() - queries.numel(), keys.numel(), device=q.device)):
            raise NotImplementedError("the real queries of a padded sequence are not its last real tokens; "
                                      f"attnlab mechanism {mechanism!r} cannot align them")
        out[b:b + 1, :, queries] = _unpadded(mechanism, q[b:b + 1, :, queries], k[b:b + 1, :, keys],
                                             v[b:b + 1, :, keys], causal=causal, scale=scale, options=options,
                                             module=module)
    return out


def attnlab_attention_function(implementation: str, mechanism: str,
                               defaults: dict[str, Any]) -> Callable[..., tuple[torch.Tensor, None]]:
    """The ``AttentionInterface`` function named ``implementation`` running ``mechanism`` with ``defaults``.

    A module switched by :func:`attnlab.hf.use` carries its own mechanism and options (read at every call).
    """

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
        setting = getattr(module, SETTING_ATTRIBUTE, None)
        if setting is not None and setting[0] == implementation:
            name, options = setting[1], setting[2]
        else:
            name, options = mechanism, defaults
        if dropout and module.training:
            raise NotImplementedError(f"attention dropout ({dropout}) in training mode: the attnlab mechanisms in "
                                      "pretrained models are for inference; call model.eval()")
        if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
            raise NotImplementedError(f"{type(module).__name__} passes softcap/sliding_window to its attention, "
                                      "which the attnlab mechanisms do not take")
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        if attention_mask is None and causal and 1 < query.shape[2] < key.shape[2]:
            # a static cache's prefill: the keys after the queries are empty slots (as transformers' SDPA path)
            key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
        if name == "softmax" and attention_mask is not None:
            _record(module, name, query, key, causal, options)
            out = softmax_attention(query, key, value, scale=scale, attn_mask=attention_mask)
        elif attention_mask is None:
            out = _unpadded(name, query, key, value, causal=causal, scale=scale, options=options, module=module)
        else:
            out = _padded(name, query, key, value, _allowed(attention_mask), causal=causal, scale=scale,
                          options=options, module=module)
        return rearrange(out, "b h n d -> b n h d").contiguous(), None

    attention.__name__ = f"{implementation}_attention"
    attention.__qualname__ = attention.__name__
    return attention
