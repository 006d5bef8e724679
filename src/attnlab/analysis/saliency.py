"""Attention versus saliency: gradient x input, occlusion, Pearson / Spearman per head, pooling.

Papi et al., "Cross-Attention is Half Explanation in Speech-to-Text Models" (arXiv 2509.18010),
attention maps are compared with input-attribution maps by Pearson correlation
(after mean-variance normalisation); per-row Pearson and Spearman are offered (inferred); the
saliency map is reduced to the attention's resolution by 2-D max pooling. The paper's attribution
method (SPES, spectrogram perturbation) is replaced here by two generic ones for token models:

- gradient x input: ``s_t = sum_c e_{t,c} * d f / d e_{t,c}`` on the input embeddings;
- occlusion: ``s_t = f(e) - f(e with token t replaced by a baseline embedding)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnlab.analysis.capture import AttentionRecord

__all__ = ["pearson", "spearman", "gradient_x_input", "occlusion_saliency", "hf_embedding_forward",
           "attention_saliency_correlation", "max_pool_saliency", "deletion_auc"]


def pearson(a: torch.Tensor, b: torch.Tensor, *, dim: int | None = None) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` (flattened, or along ``dim``); NaN for a constant input."""
    a, b = a.double(), b.double()
    if dim is None:
        a, b, dim = a.flatten(), b.flatten(), 0
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.pow(2).sum(dim).sqrt() * b.pow(2).sum(dim).sqrt())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank) along the last axis."""
    order = x.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
    flat_x, flat_r = x.reshape(-1, x.shape[-1]), ranks.reshape(-1, x.shape[-1])
    for row in range(flat_x.shape[0]):
        values, inverse = torch.unique(flat_x[row], return_inverse=True)
        if len(values) < flat_x.shape[1]:
            sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, flat_r[row])
            counts = torch.bincount(inverse, minlength=len(values)).double()
            flat_r[row] = (sums / counts)[inverse]
    return flat_r.view_as(ranks)


def spearman(a: torch.Tensor, b: torch.Tensor, *, dim: int | None = None) -> torch.Tensor:
    """Spearman rank correlation (Pearson of average ranks), flattened or along ``dim``."""
    if dim is None:
        return pearson(_ranks(a.flatten()[None])[0], _ranks(b.flatten()[None])[0])
    a_r = _ranks(a.movedim(dim, -1)).movedim(-1, dim)
    b_r = _ranks(b.movedim(dim, -1)).movedim(-1, dim)
    return pearson(a_r, b_r, dim=dim)


def gradient_x_input(forward: Callable[[torch.Tensor], torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: ``sum_c e * d f / d e`` where ``forward(embeddings [B, N, C]) -> [B]`` scores."""
    e = embeddings.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = forward(e)
        (grad,) = torch.autograd.grad(score.sum(), e)
    return (grad * e).sum(-1).detach()


def occlusion_saliency(forward: Callable[[torch.Tensor], torch.Tensor], embeddings: torch.Tensor, *,
                       baseline: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N]``: drop of ``forward`` when token ``t``'s embedding is replaced by ``baseline``
    (default zeros), one token at a time."""
    B, N, C = embeddings.shape
    baseline = torch.zeros(C, dtype=embeddings.dtype, device=embeddings.device) if baseline is None else baseline
    out = torch.zeros(B, N, dtype=torch.float64)
    with torch.no_grad():
        full = forward(embeddings).double()
        for t in range(N):
            occluded = embeddings.clone()
            occluded[:, t] = baseline
            out[:, t] = full - forward(occluded).double()
    return out


def hf_embedding_forward(model: nn.Module, score: Callable[[Any], torch.Tensor],
                         **inputs: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """For a Hugging Face model: ``(forward, embeddings)`` where ``forward(e)`` runs the model on
    ``inputs_embeds=e`` (plus the other ``inputs``, e.g. ``attention_mask``) and applies ``score``
    to the output (``[B]``), and ``embeddings`` are the input embeddings of ``inputs["input_ids"]``."""
    ids = inputs.pop("input_ids")
    embeddings = model.get_input_embeddings()(ids).detach()

    def forward(e: torch.Tensor) -> torch.Tensor:
        return score(model(inputs_embeds=e, **inputs))

    return forward, embeddings


def attention_saliency_correlation(record: AttentionRecord, saliency: torch.Tensor, *, query: int = -1,
                                   batch: int = 0, absolute: bool = True) -> dict[str, torch.Tensor]:
    """Pearson and Spearman correlation, per head, between the attention row of ``query`` and a
    saliency vector over the keys (``[M]``). ``absolute`` compares ``|saliency|`` (attention is
    non-negative). Returns ``{"pearson": [L, H], "spearman": [L, H]}`` (NaN for unrecorded layers)."""
    target = saliency.double().abs() if absolute else saliency.double()
    heads = next(iter(record.probs.values())).shape[1]
    p = torch.full((record.num_layers, heads), float("nan"), dtype=torch.float64)
    s = p.clone()
    for layer, probs in record.probs.items():
        rows = probs[batch, :, query].double()  # (H, M)
        p[layer] = pearson(rows, target.expand_as(rows), dim=-1)
        s[layer] = spearman(rows, target.expand_as(rows), dim=-1)
    return {"pearson": p, "spearman": s}


def max_pool_saliency(saliency: torch.Tensor, *, factor: int = 4) -> torch.Tensor:
    """``[I, T, F] -> [I, ceil(T / factor)]``: 2-D max pooling over (``factor`` frames x all
    frequencies), our choice of aggregator (the encoder subsamples time by 4)."""
    I, T, F = saliency.shape
    pad = (-T) % factor
    if pad:
        saliency = torch.cat([saliency, saliency.new_full((I, pad, F), float("-inf"))], dim=1)
    return saliency.reshape(I, -1, factor * F).amax(-1)


def deletion_auc(scores: torch.Tensor, percentages: torch.Tensor | None = None) -> float:
    """Area under a deletion curve ``np.trapz(scores, percentages)`` (percent steps of 5 by default)."""
    scores = scores.double()
    if percentages is None:
        percentages = torch.linspace(0, 100, len(scores), dtype=torch.float64)
    return float(torch.trapezoid(scores, percentages.double()))
