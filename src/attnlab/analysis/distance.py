"""Attention distance and entropy per head; WAAD / FAI and local-vs-global head classification.

- Mean attention distance for 1-D tokens and 2-D patches, distance profiles and local ratio:
  Li et al., "How Does Attention Work in Vision Transformers? A Visual Analytics Attempt"
  (arXiv 2303.13731). The paper body was not available: these definitions are inferred (ours,
  from its abstract and standard practice; see ``docs/analysis.md``) and stay configurable.
- Windowed Average Attention Distance (Def. 4.1, eq. 9), Future Attention Influence (Def. 4.2,
  eq. 10) and the head classification of eq. 7-8: Li et al., "Attention Illuminates LLM Reasoning:
  The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy Optimization" (arXiv 2510.13554).

All functions take post-softmax attention ``A [..., N, M]`` (rows sum to 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "token_distance", "mean_attention_distance", "attention_entropy", "grid_distance", "distance_profile",
    "local_ratio", "backward_distance", "classify_heads", "HeadClasses", "waad", "fai", "group_map",
]

GridMetric = Literal["chebyshev", "euclidean_round", "manhattan"]


def token_distance(length: int, key_length: int | None = None, *, device: torch.device | None = None) -> torch.Tensor:
    """``|i - j|`` for query ``i`` and key ``j``, ``[N, M]`` (queries aligned to the end of the keys)."""
    key_length = length if key_length is None else key_length
    i = torch.arange(length, device=device)[:, None] + (key_length - length)
    j = torch.arange(key_length, device=device)[None, :]
    return (i - j).abs().to(torch.float64)


def mean_attention_distance(probs: torch.Tensor, *, distance: torch.Tensor | None = None,
                            queries: slice | None = None) -> torch.Tensor:
    """``mean_q sum_k A[q, k] dist(q, k)`` over the query rows (and any batch axis), per head.

    Args:
        probs: ``[B, H, N, M]`` (or ``[H, N, M]``).
        distance: ``[N, M]`` distances; default the 1-D token distance ``|i - j|``; pass
            :func:`grid_distance` for 2-D patches (in patch units).
        queries: the query rows to average over (default all).

    Returns:
        ``[H]`` (float64).
    """
    if probs.ndim == 3:
        probs = probs[None]
    N, M = probs.shape[-2:]
    distance = token_distance(N, M, device=probs.device) if distance is None else distance.to(probs.device)
    if distance.shape != (N, M):
        raise ValueError(f"distance must have shape [N, M] = {[N, M]}, got {tuple(distance.shape)}")
    per_query = (probs.double() * distance.double()).sum(-1)  # (B, H, N)
    if queries is not None:
        per_query = per_query[..., queries]
    return per_query.mean(dim=(0, 2))


def attention_entropy(probs: torch.Tensor, *, normalized: bool = False, queries: slice | None = None) -> torch.Tensor:
    """Per-head Shannon entropy ``-sum_k A log A`` (nats), averaged over query rows and batch.

    With ``normalized=True`` each row's entropy is divided by ``log(visible keys)`` (1 = uniform);
    rows with a single visible key count as 0. Returns ``[H]`` (float64).
    """
    if probs.ndim == 3:
        probs = probs[None]
    p = probs.double()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # (B, H, N)
    if normalized:
        visible = (p > 0).sum(-1).double()
        entropy = torch.where(visible > 1, entropy / torch.log(visible.clamp_min(2)), torch.zeros_like(entropy))
    if queries is not None:
        entropy = entropy[..., queries]
    return entropy.mean(dim=(0, 2))


def grid_distance(grid: int | tuple[int, int], *, metric: GridMetric = "chebyshev") -> torch.Tensor:
    """``[P, P]`` distance between patches of a ``G x G`` (or ``G_r x G_c``) grid, row-major order.

    ``chebyshev`` (default, rings): ``max(|dr|, |dc|)``; ``manhattan``: ``|dr| + |dc|``;
    ``euclidean_round``: ``round(sqrt(dr^2 + dc^2))`` (inferred).
    """
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    dr = (r[:, None] - r[None, :]).abs()
    dc = (c[:, None] - c[None, :]).abs()
    if metric == "chebyshev":
        d = torch.maximum(dr, dc)
    elif metric == "manhattan":
        d = dr + dc
    elif metric == "euclidean_round":
        d = torch.round(torch.sqrt((dr ** 2 + dc ** 2).double()))
    else:
        raise ValueError(f"metric={metric!r}; expected 'chebyshev', 'euclidean_round' or 'manhattan'")
    return d.to(torch.float64)


def distance_profile(probs: torch.Tensor, distance: torch.Tensor, *, reduce: Literal["mean", "sum"] = "mean",
                     max_distance: int | None = None) -> torch.Tensor:
    """Attention strength against distance, ``S_h(delta)`` for delta = 0..max (inferred definition).

    ``reduce="mean"``: mean over queries of the mean attention to the keys at distance delta
    (corrects for how many keys lie at each distance); ``"sum"``: mean over queries of the total
    mass on ring delta. Queries with no key at distance delta are left out of that delta's mean.

    Args:
        probs: ``[B, H, P, P]`` patch-to-patch attention (CLS/register tokens removed).
        distance: ``[P, P]`` integer-valued distances (:func:`grid_distance`).

    Returns:
        ``[H, max_distance + 1]`` (float64).
    """
    if probs.ndim == 3:
        probs = probs[None]
    d = distance.round().long().to(probs.device)
    top = int(d.max()) if max_distance is None else max_distance
    p = probs.double()
    out = torch.zeros(p.shape[1], top + 1, dtype=torch.float64)
    for delta in range(top + 1):
        ring = (d == delta).double()  # (P, P)
        count = ring.sum(-1)  # (P,)
        present = count > 0
        if not bool(present.any()):
            continue
        mass = (p * ring).sum(-1)  # (B, H, P)
        value = mass / count.clamp_min(1) if reduce == "mean" else mass
        out[:, delta] = value[..., present].mean(dim=(0, 2))
    return out


def local_ratio(probs: torch.Tensor, distance: torch.Tensor, *, radius: float = 1) -> torch.Tensor:
    """``[H]``: mean over queries of the attention mass within distance ``<= radius``."""
    if probs.ndim == 3:
        probs = probs[None]
    near = (distance.to(probs.device) <= radius).double()
    return (probs.double() * near).sum(-1).mean(dim=(0, 2))


def backward_distance(probs: torch.Tensor, *, rows: Sequence[int] | slice | None = None) -> torch.Tensor:
    """Eq. 7 of arXiv 2510.13554: ``d(h) = mean_{t in R} sum_{s<=t} A[t, s] (t - s)``.

    ``probs`` ``[..., N, N]`` causal; ``rows`` the response positions R (default all). Returns the
    leading shape (e.g. ``[B, H]``), float64.
    """
    N = probs.shape[-1]
    t = torch.arange(N, device=probs.device)
    lag = (t[:, None] - t[None, :]).clamp_min(0).double()  # (N, N)
    per_row = (probs.double() * lag).sum(-1)  # (..., N)
    if rows is not None:
        per_row = per_row[..., rows]
    return per_row.mean(-1)


@dataclass
class HeadClasses:
    """Local and global heads (bottom / top quantile of the mean backward distance), ``(layer, head)`` pairs."""

    local: list[tuple[int, int]]
    global_: list[tuple[int, int]]
    distance: torch.Tensor


def classify_heads(distance: torch.Tensor, *, quantile: float = 0.3) -> HeadClasses:
    """Sort heads by ``d[L, H]`` (eq. 7); H_loc = bottom ``quantile``, H_glob = top ``quantile``
    (30 % is the paper's example value). Each set has ``round(quantile * L * H)`` heads."""
    if not 0 < quantile <= 0.5:
        raise ValueError(f"quantile={quantile} must be in (0, 0.5]")
    L, H = distance.shape
    count = int(round(quantile * L * H))
    order = torch.argsort(distance.flatten(), stable=True).tolist()
    pairs = [(i // H, i % H) for i in order]
    return HeadClasses(local=pairs[:count], global_=pairs[len(pairs) - count:], distance=distance)


def group_map(maps: torch.Tensor, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Eq. 8: the mean attention map ``[N, N]`` over the heads ``(l, h)`` of ``maps [L, H, N, N]``."""
    if not heads:
        raise ValueError("heads is empty")
    return torch.stack([maps[layer, head] for layer, head in heads]).double().mean(0)


def waad(group: torch.Tensor, *, window: int = 10, rows: Sequence[int] | None = None) -> torch.Tensor:
    """Windowed Average Attention Distance (eq. 9): ``WAAD_t = sum_{s<=t} A[t, s] min(t - s, W)``.

    ``group``: the local-head group map ``[N, N]``; returns ``[N]`` (or ``[len(rows)]``), float64.
    """
    N = group.shape[-1]
    t = torch.arange(N)
    lag = (t[:, None] - t[None, :]).clamp(min=0, max=window).double()
    out = (group.double() * lag * (t[None, :] <= t[:, None])).sum(-1)
    return out if rows is None else out[list(rows)]


def fai(group: torch.Tensor, *, h_lo: int = 10, h_hi: int = 100, rows: Sequence[int] | None = None) -> torch.Tensor:
    """Future Attention Influence (eq. 10): ``FAI_s = mean_{t in T(s)} A[t, s]`` with
    ``T(s) = {t in R : s + h_lo <= t <= min(N - 1, s + h_hi)}`` (0-based; inferred from the paper's
    1-based text). NaN where ``T(s)`` is empty. ``group``: the global-head map ``[N, N]``;
    ``rows``: the response positions R (default all). Returns ``[N]`` float64."""
    N = group.shape[-1]
    allowed = torch.zeros(N, dtype=torch.bool)
    allowed[list(range(N)) if rows is None else list(rows)] = True
    out = torch.full((N,), float("nan"), dtype=torch.float64)
    g = group.double()
    for s in range(N):
        lo, hi = s + h_lo, min(N - 1, s + h_hi)
        if lo > hi:
            continue
        ts = torch.arange(lo, hi + 1)
        ts = ts[allowed[ts]]
        if len(ts):
            out[s] = g[ts, s].mean()
    return out
