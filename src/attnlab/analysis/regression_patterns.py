"""In-context linear regression patterns of one-layer multi-head softmax attention.

He, Pan, Chen & Yang, "In-Context Linear Regression Demystified" (ICML 2025, arXiv 2503.12734),
The model: ``y_hat = sum_h W_O^h sum_l softmax_l((W_Q^h z_q)^T (W_K^h z_l) / sqrt(d+1)) W_V^h z_l``
with tokens ``z = [x; y]`` in ``R^{d+1}`` and the query ``z_q = [x_q; 0]``.

Per head, in ``nn.Linear`` weight convention (``q = W_Q z``):

- ``KQ^h = W_Q^{hT} W_K^h`` so that the score is ``z_q^T KQ^h z_l`` (the paper's ``W_Q W_K^T`` with
  column-vector weights);
- ``OV^h = (W_O^h W_V^h)^T`` in ``R^{d+1}``: how each input coordinate reaches the output.

Emergent patterns: ``KQ^h ~ [[omega_h I_d, 0], [0, 0]]``, ``OV^h ~ [0, ..., 0, mu_h]``,
``sum_h mu_h ~ 0``. The metrics (our definitions; the paper shows heatmaps):
``diag_ratio``, ``homog``, ``omega``, ``last_entry_ratio``, ``mu``, ``zero_sum``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["kq_ov", "icl_weights_from_classifier", "pattern_metrics", "icl_attention_forward", "dgd_predict",
           "gd_predict", "tf_reduced_predict", "ridge_predict", "ridge_loss", "optimal_mu"]


def kq_ov(w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(KQ [H, d+1, d+1], OV [H, d+1])`` from per-head weights ``w_q, w_k, w_v [H, e, d+1]``
    (``nn.Linear`` convention, out x in; ``e`` the head dim, ``d+1`` in the paper) and ``w_o [H, e]``
    (head ``h``'s slice of the read-out)."""
    kq = w_q.transpose(-1, -2) @ w_k  # (H, d+1, d+1)
    ov = (w_o[:, None, :] @ w_v)[:, 0]  # (H, d+1)
    return kq, ov


def icl_weights_from_classifier(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Per-head ``(w_q, w_k, w_v, w_o)`` in token coordinates for the in-context regression model of
    the quality benchmark (``attnlab.models.SequenceClassifier`` with a linear input embedding, one
    block whose mixer is :class:`attnlab.nn.Attention`, read-out at the last token).

    With the embedding ``e = E z (+ b)``, head ``h``'s effective maps are ``W_Q^h E``, ``W_K^h E``,
    ``W_V^h E`` (``[d+1, d+1]`` when the head dim is ``d+1``), and its read-out is
    ``w_o^h = w_head W_out[:, h]``. The embedding bias and the residual path ``w_head E z_q`` are
    affine / per-query terms outside the per-head patterns and are left out (inferred adapter: the
    paper's model has neither).
    """
    from attnlab.nn.attention import Attention

    embed = getattr(model, "embed", None)
    blocks = getattr(getattr(model, "trunk", None), "blocks", None)
    if not isinstance(embed, torch.nn.Linear) or blocks is None or len(blocks) != 1 \
            or not isinstance(getattr(blocks[0], "mixer", None), Attention):
        raise ValueError("expected a SequenceClassifier with input_dim= (linear embedding), depth 1 and an "
                         "attnlab.nn.Attention mixer (the in-context regression model of the quality benchmark)")
    attn = blocks[0].mixer
    H, hd, kv = attn.heads, attn.head_dim, attn.kv_heads
    E = embed.weight.detach()  # (dim, d+1)
    w_q = attn.to_q.weight.detach().view(H, hd, -1) @ E  # (H, hd, d+1)
    w_kv = attn.to_kv.weight.detach().view(2, kv, hd, -1) @ E  # (2, H_kv, hd, d+1)
    w_k = w_kv[0].repeat_interleave(H // kv, dim=0)
    w_v = w_kv[1].repeat_interleave(H // kv, dim=0)
    readout = model.head.weight.detach()  # (1, dim)
    if readout.shape[0] != 1:
        raise ValueError(f"expected one output (regression), got {readout.shape[0]}")
    w_o = (readout @ attn.to_out.weight.detach()).view(H, hd)  # (H, hd)
    return w_q, w_k, w_v, w_o


def pattern_metrics(kq: torch.Tensor, ov: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """The pattern metrics: per head ``diag_ratio = ||diag(KQ_xx)|| / ||KQ||_F`` (1 ideal),
    ``homog = std(diag(KQ_xx)) / |mean(diag(KQ_xx))|`` (0 ideal), ``omega = mean(diag(KQ_xx))``,
    ``last_entry_ratio = |OV[d]| / ||OV||`` (1 ideal), ``mu = OV[d]``; and over heads
    ``zero_sum = |sum mu| / sum |mu|`` (0 ideal). ``std`` is the population std (inferred)."""
    kq, ov = kq.double(), ov.double()
    diag = torch.diagonal(kq[:, :-1, :-1], dim1=-2, dim2=-1)  # (H, d)
    mu = ov[:, -1]
    return {
        "diag_ratio": diag.norm(dim=-1) / kq.flatten(1).norm(dim=-1),
        "homog": diag.std(-1, correction=0) / diag.mean(-1).abs(),
        "omega": diag.mean(-1),
        "last_entry_ratio": mu.abs() / ov.norm(dim=-1),
        "mu": mu,
        "zero_sum": float(mu.sum().abs() / mu.abs().sum()),
    }


def icl_attention_forward(z: torch.Tensor, z_q: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                          w_v: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """The paper's one-layer model written out: ``z [B, L, d+1]``, ``z_q [B, d+1]``,
    weights as in :func:`kq_ov`; returns ``y_hat [B]``. The query does not attend to itself."""
    scale = z.shape[-1] ** -0.5
    q = torch.einsum("hij,bj->bhi", w_q, z_q)  # (B, H, d+1)
    k = torch.einsum("hij,blj->bhli", w_k, z)  # (B, H, L, d+1)
    v = torch.einsum("hij,blj->bhli", w_v, z)  # (B, H, L, d+1)
    a = torch.softmax(torch.einsum("bhi,bhli->bhl", q, k) * scale, -1)  # (B, H, L)
    heads = torch.einsum("bhl,bhli->bhi", a, v)  # (B, H, d+1)
    return torch.einsum("bhi,hi->b", heads, w_o)


def gd_predict(x: torch.Tensor, y: torch.Tensor, x_q: torch.Tensor, omega: float, mu: float) -> torch.Tensor:
    """One GD step from 0: ``(2 omega mu / L) sum_l y_l x_l^T x_q``; ``x [B, L, d]``, ``y [B, L]``, ``x_q [B, d]``."""
    return 2 * omega * mu / x.shape[1] * torch.einsum("bl,bld,bd->b", y, x, x_q)


def dgd_predict(x: torch.Tensor, y: torch.Tensor, x_q: torch.Tensor, omega: float, mu: float) -> torch.Tensor:
    """Debiased GD: ``(2 omega mu / L) sum_l y_l (x_l - x_bar)^T x_q`` (what two sign-opposed heads compute)."""
    centred = x - x.mean(1, keepdim=True)
    return 2 * omega * mu / x.shape[1] * torch.einsum("bl,bld,bd->b", y, centred, x_q)


def tf_reduced_predict(x: torch.Tensor, y: torch.Tensor, x_q: torch.Tensor, omega: torch.Tensor,
                       mu: torch.Tensor) -> torch.Tensor:
    """The pattern-reduced predictor ``sum_h mu_h sum_l y_l softmax_l(omega_h x_l^T x_q)``."""
    scores = torch.einsum("h,bld,bd->bhl", omega.to(x.dtype), x, x_q)
    return torch.einsum("h,bhl,bl->b", mu.to(x.dtype), torch.softmax(scores, -1), y)


def optimal_mu(omega: torch.Tensor, *, d: int, L: int, noise: float) -> torch.Tensor:
    """``mu*(omega) = (omega omega^T + (1 + sigma^2) L^-1 exp(d omega omega^T))^-1 omega`` (element-wise exp)."""
    w = omega.double()
    outer = torch.outer(w, w)
    return torch.linalg.solve(outer + (1 + noise) / L * torch.exp(d * outer), w)


def ridge_predict(x: torch.Tensor, y: torch.Tensor, x_q: torch.Tensor, *, lam: float) -> torch.Tensor:
    """Bayes-optimal ridge ``beta = (X^T X + lam I)^-1 X^T y``, ``y_hat = x_q^T beta`` (``lam = sigma^2 d``
    for ``beta ~ N(0, I / d)``)."""
    d = x.shape[-1]
    gram = x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=x.dtype)
    beta = torch.linalg.solve(gram, (x.transpose(1, 2) @ y[..., None]))[..., 0]
    return (beta * x_q).sum(-1)


def ridge_loss(noise: float, gamma: float) -> float:
    """Asymptotic test risk of the Bayes-optimal ridge predictor (noise of ``y_q`` included):
    ``0.5 (sigma^2 + (g - 1)/g + sqrt(4 sigma^2 + (sigma^2 + (1 - g)/g)^2))`` evaluated at
    ``g = gamma = d / L``.

    Evaluated at ``xi = L / d`` instead, the same formula would give risk 1 with infinitely many
    examples and 0 with none. A Monte-Carlo check of
    :func:`ridge_predict` (d = 5, L = 40, sigma^2 = 0.1: 0.116 measured) agrees with the formula at
    ``xi = d / L`` (0.114), so the argument here is ``gamma = d / L`` (documented deviation).
    """
    xi = gamma
    return 0.5 * (noise + (xi - 1) / xi + math.sqrt(4 * noise + (noise + (1 - xi) / xi) ** 2))
