"""Additive (tanh) attention pooling, the layer that Attention AT / iAT perturbs.

Kitada & Iyatomi, "Attention Meets Perturbations: Robust and Interpretable Attention with Adversarial
Training", arXiv 2009.12064 (code shunk031/attention-meets-perturbation, ``TanhBCATBase``).
"""

from __future__ import annotations

import torch
from torch import nn

from attnlab.nn.sequence_input import check_padding_mask, check_sequence
from attnlab.ops.validation import check_int, check_tensor
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["AdditiveAttentionPooling"]


class AdditiveAttentionPooling(nn.Module):
    """``ã_t = w2^T tanh(W1 h_t + b1)``, ``a = masked_softmax(ã)``, ``c = sum_t a_t h_t``.

    The attention of the binary-classification models of arXiv 2009.12064 (``TanhBCATBase``:
    ``W1: dim -> dim // 2`` with bias, ``w2: dim // 2 -> 1`` without). :meth:`scores` gives ``ã`` and
    :meth:`pool` takes (possibly perturbed) scores, so that
    :func:`attnlab.adversarial.attention_adversarial_loss` can add its perturbation between them::

        scores = layer.scores(h)                                            # [B, T]
        loss = attention_adversarial_loss(lambda s: task_loss(layer.pool(h, s, mask)[0]), scores,
                                          mask=mask).total

    ``forward(x [B, T, dim], key_padding_mask=None)`` returns the context ``[B, dim]`` and the
    attention ``[B, T]``.

    Args:
        dim: width of the hidden states (256 = 2 x 128 BiLSTM in the paper).
        hidden: width of ``W1`` (default ``dim // 2``, as in the code).
    """

    def __init__(self, dim: int, *, hidden: int | None = None) -> None:
        super().__init__()
        check_int("hidden", hidden, minimum=1, allow_none=True)
        hidden = max(1, dim // 2) if hidden is None else hidden
        if dim <= 0 or hidden <= 0:
            raise ValueError(f"dim and hidden must be positive, got dim={dim}, hidden={hidden}")
        self.dim = dim
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores ``ã [B, T]`` of ``x [B, T, dim]``."""
        return self.score(check_sequence("x", x, self.dim)).squeeze(-1)

    def pool(self, x: torch.Tensor, scores: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context ``[B, dim]`` and attention ``[B, T]`` from ``x`` and the scores (masked softmax)."""
        x = check_sequence("x", x, self.dim)
        check_tensor("scores", scores, ndim=2, layout="[B, T]")
        if scores.shape != x.shape[:2]:
            raise ValueError(f"scores must have shape [B, T] = {list(x.shape[:2])}, got {tuple(scores.shape)}")
        if key_padding_mask is not None:
            check_padding_mask("key_padding_mask", key_padding_mask, x.shape[0], x.shape[1], x.device)
            scores = scores.masked_fill(~key_padding_mask, float("-inf"))
        attention = scores.softmax(dim=-1)  # (B, T)
        return torch.einsum("bt,btd->bd", attention, x), attention

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool(x, self.scores(x), key_padding_mask)


def _build(dim: int, heads: int, *, causal: bool = False, **config: object) -> AdditiveAttentionPooling:
    if causal:
        raise NotImplementedError("additive attention pooling summarises a whole sequence; no causal form")
    return AdditiveAttentionPooling(dim, **config)  # type: ignore[arg-type]


def _inputs(layer: AdditiveAttentionPooling, *, batch: int, length: int, dim: int, dtype: torch.dtype,
            generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    return {"x": x}, (batch, dim)


register(Mechanism(
    name="additive_at",
    op=None,
    reference=None,
    layer=AdditiveAttentionPooling,
    family="pooling",
    paper="Attention Meets Perturbations: Robust and Interpretable Attention with Adversarial Training",
    arxiv="2009.12064",
    supports_causal=False,
    supports_bidirectional=True,
    complexity="O(T d^2)",
    check=CheckConfig(layer_build=_build, layer_inputs=_inputs),
    role="pooling",
))
