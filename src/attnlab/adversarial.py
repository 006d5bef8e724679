"""Adversarial training on the attention scores (Attention AT / Attention iAT): the loss and its measure.

Kitada & Iyatomi, "Attention Meets Perturbations: Robust and Interpretable Attention with Adversarial
Training", IEEE Access 2021, arXiv 2009.12064 (authors' code: shunk031/attention-meets-perturbation,
``amep/modules/attention_layer/bc/advt.py``). The equations are written out in ``docs/mechanisms.md``
(additive attention pooling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["AdversarialLoss", "attention_adversarial_loss", "attention_adversarial_perturbation",
           "attention_importance_correlation"]


@dataclass(frozen=True)
class AdversarialLoss:
    """Result of :func:`attention_adversarial_loss`.

    Attributes:
        total: ``clean + lam * adversarial``, the loss to back-propagate.
        clean: ``ℓ(ã)``, the loss on the unperturbed scores.
        adversarial: ``ℓ(ã + r)``.
        perturbation: ``r`` (detached), shape of the scores; zero at padded positions.
    """

    total: torch.Tensor
    clean: torch.Tensor
    adversarial: torch.Tensor
    perturbation: torch.Tensor


def _per_example_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` per example (norm over every axis but the batch one); zero rows stay zero."""
    flat = x.reshape(x.shape[0], -1)
    return F.normalize(flat, dim=1).reshape(x.shape)


def _check(scores: torch.Tensor, mask: torch.Tensor | None, xi: float, lam: float, method: str, mode: str) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating torch.Tensor [B, T, ...], got "
                        f"{scores.dtype if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if scores.ndim < 2 or 0 in scores.shape:
        raise ValueError(f"scores must have shape [B, T, ...] (batch first, non-empty), got {tuple(scores.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a boolean tensor (True = real token)")
        if mask.shape != scores.shape:
            raise ValueError(f"mask must have the shape of scores {tuple(scores.shape)}, got {tuple(mask.shape)}")
    if not (xi >= 0 and xi < float("inf")):
        raise ValueError(f"xi must be a finite number >= 0, got xi={xi}")
    if not (lam >= 0 and lam < float("inf")):
        raise ValueError(f"lam must be a finite number >= 0, got lam={lam}")
    if method not in ("at", "iat"):
        raise ValueError(f"method={method!r} is not one of 'at', 'iat'")
    if mode not in ("reference_code", "paper"):
        raise ValueError(f"mode={mode!r} is not one of 'reference_code', 'paper'")


def attention_adversarial_perturbation(gradient: torch.Tensor, scores: torch.Tensor, *,
                                       method: Literal["at", "iat"] = "at",
                                       mode: Literal["reference_code", "paper"] = "reference_code",
                                       xi: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The perturbation ``r`` of the attention scores from ``gradient = ∇_ã ℓ`` (both ``[B, T, ...]``).

    - ``method="at"`` (Attention AT): ``r = xi * g / ||g||`` per example.
    - ``method="iat", mode="reference_code"`` (``TanhBCAttentioniAT`` as shipped): the first-step
      perturbation is ``normalize(sum_j alpha_ij dir_ij)`` at ``alpha = 0``, i.e. zero, so its gradient
      is ``∇_ã ℓ`` and ``r = xi * normalize(-g)``: AT with the opposite sign; the difference
      directions are unused. This is the default because it produced the published numbers.
    - ``method="iat", mode="paper"`` (inferred, after Sato et al. 2018's interpretable AT): directions
      ``d_ij = normalize(ã_i - ã_j)`` between the sentences of the batch, ``∂ℓ/∂alpha_ij = <g_i, d_ij>``,
      ``alpha_i* = xi * normalize_j(∂ℓ/∂alpha_i)`` and ``r_i = xi * normalize(sum_j alpha_ij* d_ij)``.
      A batch of one sentence has no direction: ``r = 0``. The differences of sentence ``i`` are
      restricted to its real tokens (the sentences are padded to a common ``T``).

    Padded positions (``mask`` False) get no perturbation.
    """
    _check(scores, mask, xi, 0.0, method, mode)
    if gradient.shape != scores.shape:
        raise ValueError(f"gradient must have the shape of scores {tuple(scores.shape)}, got {tuple(gradient.shape)}")
    g = gradient.detach()
    if mask is not None:
        g = g.masked_fill(~mask, 0.0)
    if method == "at":
        r = xi * _per_example_normalize(g)
    elif mode == "reference_code":
        r = xi * _per_example_normalize(-g)
    else:
        s = scores.detach()
        if mask is not None:
            s = s.masked_fill(~mask, 0.0)
        flat, grad = s.reshape(s.shape[0], -1), g.reshape(g.shape[0], -1)  # (B, T)
        differences = flat[:, None, :] - flat[None, :, :]  # (B, B, T): ã_i - ã_j; d_ii = 0
        if mask is not None:  # sentence i is perturbed on its own real tokens only
            differences = differences * mask.reshape(mask.shape[0], 1, -1)
        directions = F.normalize(differences, dim=-1)
        alpha_grad = torch.einsum("bt,bjt->bj", grad, directions)  # ∂ℓ/∂alpha_ij at alpha = 0
        alpha = xi * F.normalize(alpha_grad, dim=1)
        r = xi * F.normalize(torch.einsum("bj,bjt->bt", alpha, directions), dim=1).reshape(s.shape)
    if mask is not None:
        r = r.masked_fill(~mask, 0.0)
    return r


def attention_adversarial_loss(loss_of_scores: Callable[[torch.Tensor], torch.Tensor], scores: torch.Tensor, *,
                               method: Literal["at", "iat"] = "at",
                               mode: Literal["reference_code", "paper"] = "reference_code",
                               xi: float = 1.0, lam: float = 1.0,
                               mask: torch.Tensor | None = None) -> AdversarialLoss:
    """Adversarial training on the pre-softmax attention scores: ``L = ℓ(ã) + lam * ℓ(ã + r)``.

    Kitada & Iyatomi, "Attention Meets Perturbations", arXiv 2009.12064 (Attention AT and Attention
    iAT, as in ``amep/modules/attention_layer/bc/advt.py``):

    1. ``ℓ(ã + d)`` with ``d = 0``; its gradient ``g = ∇_d ℓ = ∇_ã ℓ`` (per example, through the masked
       softmax, so padded positions get none).
    2. ``r`` from ``g`` (see :func:`attention_adversarial_perturbation`; AT: ``r = xi g / ||g||``).
    3. ``L = ℓ(ã) + lam ℓ(ã + r)`` with ``r`` a constant.

    Args:
        loss_of_scores: maps attention scores (the shape of ``scores``) to the scalar training loss:
            the rest of the model after the scores (masked softmax, pooling, classifier, loss).
        scores: the pre-softmax attention scores ``ã [B, T, ...]`` of the current batch, attached to
            the model's graph. The norms are taken per example over every non-batch axis (the
            sequence axis for the paper's ``[B, T]``).
        method: "at" or "iat". mode: for "iat", "reference_code" (default) or "paper" (inferred).
        xi: perturbation size ξ (the shipped configs do not set it; 1.0 is an inferred default, the paper
            reports little sensitivity to it).
        lam: weight of the adversarial loss (``lam_adv = 1.0`` in the code).
        mask: boolean, the shape of ``scores``, True = real token.

    Use only in training; evaluate without perturbation.
    """
    _check(scores, mask, xi, lam, method, mode)
    probe = torch.zeros_like(scores, requires_grad=True)
    clean = loss_of_scores(scores + probe)
    if not isinstance(clean, torch.Tensor) or clean.ndim != 0:
        raise ValueError("loss_of_scores must return a scalar tensor (the batch loss)")
    (gradient,) = torch.autograd.grad(clean, probe, retain_graph=True)
    r = attention_adversarial_perturbation(gradient, scores, method=method, mode=mode, xi=xi, mask=mask)
    adversarial = loss_of_scores(scores + r)
    return AdversarialLoss(total=clean + lam * adversarial, clean=clean, adversarial=adversarial, perturbation=r)


def attention_importance_correlation(attention: torch.Tensor, importance: torch.Tensor,
                                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pearson correlation per sentence between attention weights and word importance, ``[B]``.

    The interpretability measure of arXiv 2009.12064 (the paper reports two correlations; Pearson is
    the one computed here, a choice of ours): ``attention, importance [B, T]`` (e.g. ``|∂ŷ/∂e_t|``),
    over the real tokens of each sentence (``mask``, True = real). A sentence with fewer than two
    real tokens, or constant values, gives NaN.
    """
    if attention.shape != importance.shape or attention.ndim != 2:
        raise ValueError(f"attention and importance must both be [B, T], got {tuple(attention.shape)} and "
                         f"{tuple(importance.shape)}")
    mask = torch.ones_like(attention, dtype=torch.bool) if mask is None else mask
    weight = mask.to(torch.float64)
    count = weight.sum(dim=1)
    a, b = attention.double(), importance.double()
    a = (a - (a * weight).sum(1, keepdim=True) / count[:, None]) * weight
    b = (b - (b * weight).sum(1, keepdim=True) / count[:, None]) * weight
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
