"""Attention sinks: massive-activation dimensions, sink tokens, and the attention share they take.

Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025
(DimProspector of the official ``src/logic/logic.py``):

- parameter-free RMS normalisation of the hidden state entering layer ``l``:
  ``Z = X / sqrt(mean(X^2, -1) + 1e-6)`` (float32);
- ``phi(x_t) = max_{d in D_sink} |Z[t, d]|``; token ``t`` is a sink of layer ``l`` iff ``phi > tau``
  (``tau = 20``), for the layers ``l >= 2``.

The sink dimensions are fixed per model in the paper (LLaMA-2-7B: 2533, 1415). For other models
:func:`find_sink_dims` ranks dimensions from the data; that ranking is ours (inferred), not
the published method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnlab.analysis.capture import AttentionRecord

__all__ = ["rms_normalize", "sink_tokens", "sinks_by_layer", "find_sink_dims", "massive_activations",
           "sink_attention_share", "MassiveActivation"]


def rms_normalize(hidden: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """``X / sqrt(mean(X^2, -1) + eps)`` in float32, no learned gain."""
    x = hidden.float()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def sink_tokens(hidden: torch.Tensor, dims: Sequence[int], *, tau: float = 20.0) -> torch.Tensor:
    """Boolean ``[B, T]`` (or ``[T]`` for ``[T, d]`` input): ``max_{d in dims} |Z[t, d]| > tau``.

    Args:
        hidden: the residual stream entering a layer, ``[B, T, d]`` or ``[T, d]``.
        dims: the sink dimensions ``D_sink``.
        tau: threshold (20 in the paper's configs).
    """
    if not len(dims):
        raise ValueError("dims is empty: give the sink dimensions (see find_sink_dims)")
    width = hidden.shape[-1]
    bad = [d for d in dims if not 0 <= d < width]
    if bad:
        raise ValueError(f"dims {bad} out of range for hidden size {width}")
    z = rms_normalize(hidden)[..., list(dims)].abs()  # (..., T, |dims|)
    return z.amax(-1) > tau


def sinks_by_layer(record: AttentionRecord, dims: Sequence[int], *, tau: float = 20.0, first_layer: int = 2,
                   batch: int = 0) -> dict[int, list[int]]:
    """``{layer: sink positions}`` for the recorded hidden states of layers ``>= first_layer``
    (the paper's ``sink_select_layers = range(L)[2:]``), for one batch element."""
    if not record.hidden:
        raise ValueError("the record has no hidden states: capture(..., what=(..., 'hidden'))")
    return {layer: torch.nonzero(sink_tokens(x[batch], dims, tau=tau)).flatten().tolist()
            for layer, x in sorted(record.hidden.items()) if layer >= first_layer}


def find_sink_dims(record: AttentionRecord, *, top: int = 2, token_fraction: float = 0.05,
                   first_layer: int = 2) -> list[int]:
    """Rank hidden dimensions by how often ``|Z[t, d]|`` is the largest entry of a high-attention
    token's row (inferred: our extension, not the paper's method; the paper
    hard-codes the dimensions per model).

    High-attention tokens are, per recorded layer ``>= first_layer`` and batch element, the top
    ``token_fraction`` of key positions (at least one) by attention received (mean over heads and
    queries). Needs ``hidden`` and ``probs`` in the record. Ties are broken by the largest ``|Z|``.
    """
    layers = [layer for layer in sorted(record.hidden) if layer >= first_layer and layer in record.probs]
    if not layers:
        raise ValueError("find_sink_dims needs hidden states and probabilities of layers >= first_layer "
                         "in the record: capture(..., what=('probs', 'hidden'))")
    width = record.hidden[layers[0]].shape[-1]
    counts = torch.zeros(width, dtype=torch.float64)
    peaks = torch.zeros(width, dtype=torch.float64)
    for layer in layers:
        z = rms_normalize(record.hidden[layer]).abs()  # (B, T, d)
        received = record.probs[layer].float().mean(dim=(1, 2))  # (B, M)
        k = max(1, int(round(received.shape[-1] * token_fraction)))
        tokens = torch.topk(received, k, dim=-1).indices  # (B, k)
        rows = torch.gather(z, 1, tokens[..., None].expand(-1, -1, width))  # (B, k, d)
        best = rows.argmax(-1).flatten()
        counts += torch.bincount(best, minlength=width).double()
        peaks = torch.maximum(peaks, rows.amax(dim=(0, 1)).double())
    order = sorted(range(width), key=lambda d: (-counts[d].item(), -peaks[d].item()))
    return order[:top]


@dataclass
class MassiveActivation:
    """The largest ``|X|`` entry of one layer's input: value, token position and dimension, and its
    ratio to the median ``|X|`` of that layer."""

    layer: int
    value: float
    token: int
    dim: int
    ratio_to_median: float


def massive_activations(record: AttentionRecord, *, batch: int = 0, top: int = 1) -> list[MassiveActivation]:
    """The ``top`` largest-magnitude hidden-state entries per recorded layer (massive activations)."""
    out: list[MassiveActivation] = []
    for layer, x in sorted(record.hidden.items()):
        a = x[batch].float().abs()  # (T, d)
        median = float(a.median())
        values, flat = torch.topk(a.flatten(), top)
        for value, index in zip(values.tolist(), flat.tolist(), strict=True):
            out.append(MassiveActivation(layer=layer, value=value, token=index // a.shape[1], dim=index % a.shape[1],
                                         ratio_to_median=value / max(median, 1e-12)))
    return out


def sink_attention_share(record: AttentionRecord, sinks: dict[int, Sequence[int]] | Sequence[int], *,
                         query_start: int = 0) -> torch.Tensor:
    """``[L, H]``: mean over batch and query rows ``>= query_start`` of the attention on the sink keys.

    ``sinks`` is either one list of key positions for every layer, or ``{layer: positions}``;
    layers without probabilities in the record, or without sinks, give 0.
    """
    if not record.probs:
        raise ValueError("the record has no probabilities: capture(..., what=('probs', ...))")
    heads = next(iter(record.probs.values())).shape[1]
    out = torch.zeros(record.num_layers, heads, dtype=torch.float64)
    for layer, probs in record.probs.items():
        positions = sinks.get(layer, []) if isinstance(sinks, dict) else sinks
        if not len(positions):
            continue
        mass = probs[..., query_start:, :][..., list(positions)].double().sum(-1)  # (B, H, N')
        out[layer] = mass.mean(dim=(0, 2))
    return out
