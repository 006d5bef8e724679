"""In-context linear regression, with its ridge (Bayes-optimal) and one-step gradient-descent baselines.

He, Pan, Chen & Yang, "In-Context Linear Regression Demystified: Training Dynamics and Mechanistic
Interpretability of Multi-Head Softmax Attention", ICML 2025, arXiv 2503.12734 (generator: the
authors' ``LinearReg``; baselines: ``RidgeEst`` / ``GDEst`` / ``DGDEst``).

Each prompt draws ``beta ~ N(0, I_d / d)`` (``beta_scale="1/d"``, the authors' code; ``"1"`` gives
``N(0, I_d)``), ``x_l ~ N(0, I_d)`` for ``l = 1..L`` and a query ``x_q``, ``y = beta^T x + eps`` with
``eps ~ N(0, sigma^2)``. The model reads the tokens ``z_l = [x_l; y_l]`` and then ``z_q = [x_q; 0]`` and
must output ``y_q``. Paper setting: ``d = 5``, ``L = 40``, ``sigma^2 = 0.1``.

Worked example (``d = 2``, ``L = 2``; numbers rounded)::

    beta = [0.5, -1.0]
    tokens  = [[ 1.0,  2.0, -1.4],      # z_1 = [x_1; y_1], y_1 = 0.5 - 2.0 + 0.1 (noise)
               [-0.3,  0.4, -0.6],      # z_2 = [x_2; y_2]
               [ 2.0,  1.0,  0.0]]      # z_q = [x_q; 0]
    target  = 0.0 + noise                # y_q = beta^T x_q + eps = 1.0 - 1.0 + eps

Baselines (the authors' ``RidgeEst`` / ``GDEst`` / ``DGDEst``): ridge ``beta_hat = (X X^T + lambda I)^{-1} X y``
with ``lambda = sigma^2 / tau^2`` (``= sigma^2 d`` for ``tau^2 = 1/d``), and the one-step gradient-descent predictor
``y_GD = (eta / L) sum_l y_l x_l^T x_q``; its debiased form (what two sign-opposed softmax heads
implement) centres the inputs: ``y_DGD = (eta / L) sum_l y_l (x_l - x_bar)^T x_q``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ICLRegressionConfig", "ICLBatch", "sample_linear_regression", "ridge_predict", "one_step_gd_predict",
           "best_gd_step", "evaluation_set", "baseline_losses"]

BETA_SCALES = ("1/d", "1")


@dataclass(frozen=True)
class ICLRegressionConfig:
    """Task sizes and the training recipe (paper: Adam 1e-3, batch 256, one attention layer, 4 heads)."""

    dim: int = 5
    length: int = 40
    noise_variance: float = 0.1
    beta_scale: str = "1/d"
    heads: int = 4
    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    test_examples: int = 10000


@dataclass(frozen=True)
class ICLBatch:
    """One batch of prompts: ``tokens [n, L + 1, d + 1]`` (the query token last), ``target [n]``,
    and the raw ``x [n, L, d]``, ``y [n, L]``, ``x_query [n, d]``, ``beta [n, d]``."""

    tokens: torch.Tensor
    target: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    x_query: torch.Tensor
    beta: torch.Tensor


def sample_linear_regression(num_examples: int, *, dim: int = 5, length: int = 40, noise_variance: float = 0.1,
                             beta_scale: str = "1/d", generator: torch.Generator | None = None,
                             dtype: torch.dtype = torch.float32) -> ICLBatch:
    """Draw ``num_examples`` prompts (the authors' ``LinearReg`` generator, see the module docstring)."""
    if beta_scale not in BETA_SCALES:
        raise ValueError(f"beta_scale={beta_scale!r} is not one of {BETA_SCALES}")
    if dim < 1 or length < 1:
        raise ValueError(f"dim={dim} and length={length} must be positive")
    if noise_variance < 0:
        raise ValueError(f"noise_variance={noise_variance} must be non-negative")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = num_examples
    tau = math.sqrt(1.0 / dim) if beta_scale == "1/d" else 1.0
    beta = torch.randn(n, dim, generator=generator, dtype=torch.float64) * tau  # (n, d)
    x = torch.randn(n, length, dim, generator=generator, dtype=torch.float64)  # (n, L, d)
    x_query = torch.randn(n, dim, generator=generator, dtype=torch.float64)  # (n, d)
    noise_std = math.sqrt(noise_variance)
    y = torch.einsum("nld,nd->nl", x, beta) + noise_std * torch.randn(n, length, generator=generator,
                                                                       dtype=torch.float64)
    target = (x_query * beta).sum(-1) + noise_std * torch.randn(n, generator=generator, dtype=torch.float64)
    context = torch.cat([x, y[..., None]], dim=-1)  # (n, L, d+1)
    query = torch.cat([x_query, torch.zeros(n, 1, dtype=torch.float64)], dim=-1)[:, None]  # (n, 1, d+1)
    tokens = torch.cat([context, query], dim=1)  # (n, L+1, d+1)
    return ICLBatch(*(t.to(dtype) for t in (tokens, target, x, y, x_query, beta)))


def ridge_predict(x: torch.Tensor, y: torch.Tensor, x_query: torch.Tensor, *, ridge: float) -> torch.Tensor:
    """``x_q^T (X^T X + ridge I)^{-1} X^T y`` per prompt: ``x [n, L, d]``, ``y [n, L]``, ``x_query [n, d]``."""
    if ridge < 0:
        raise ValueError(f"ridge={ridge} must be non-negative")
    gram = x.transpose(1, 2) @ x + ridge * torch.eye(x.shape[-1], dtype=x.dtype)  # (n, d, d)
    beta_hat = torch.linalg.solve(gram, (x.transpose(1, 2) @ y[..., None]))[..., 0]  # (n, d)
    return (beta_hat * x_query).sum(-1)


def one_step_gd_predict(x: torch.Tensor, y: torch.Tensor, x_query: torch.Tensor, *, step: float,
                        debiased: bool = True) -> torch.Tensor:
    """``(step / L) sum_l y_l (x_l - x_bar)^T x_q`` (``debiased=False``: without ``- x_bar``)."""
    inputs = x - x.mean(dim=1, keepdim=True) if debiased else x  # (n, L, d)
    return step * torch.einsum("nl,nld,nd->n", y, inputs, x_query) / x.shape[1]


def best_gd_step(batch: ICLBatch, *, debiased: bool = True) -> float:
    """The step ``eta`` minimising the mean squared error of the one-step predictor on ``batch``
    (least squares in one variable: ``eta = <g, y_q> / <g, g>`` with ``g`` the unit-step prediction)."""
    unit = one_step_gd_predict(batch.x.double(), batch.y.double(), batch.x_query.double(), step=1.0,
                               debiased=debiased)
    return float((unit * batch.target.double()).sum() / (unit * unit).sum())


def baseline_losses(config: ICLRegressionConfig, *, seed: int, fit_examples: int = 20000) -> dict[str, float]:
    """Test mean squared errors of the zero, ridge and best one-step (debiased) GD predictors.

    The GD step is fitted on a separate draw of ``fit_examples`` prompts; all are evaluated on the
    task's test set for ``seed`` (the same prompts the models are tested on).
    """
    fit = sample_linear_regression(fit_examples, dim=config.dim, length=config.length,
                                   noise_variance=config.noise_variance, beta_scale=config.beta_scale,
                                   generator=torch.Generator().manual_seed(10_000 + seed), dtype=torch.float64)
    test = evaluation_set(config, seed=seed, dtype=torch.float64)
    tau2 = 1.0 / config.dim if config.beta_scale == "1/d" else 1.0
    ridge = ridge_predict(test.x, test.y, test.x_query, ridge=config.noise_variance / tau2)
    losses = {"zero": float((test.target ** 2).mean()), "ridge": float(((ridge - test.target) ** 2).mean())}
    for name, debiased in (("gd_one_step", False), ("debiased_gd_one_step", True)):
        step = best_gd_step(fit, debiased=debiased)
        prediction = one_step_gd_predict(test.x, test.y, test.x_query, step=step, debiased=debiased)
        losses[name] = float(((prediction - test.target) ** 2).mean())
    return losses


def evaluation_set(config: ICLRegressionConfig, *, seed: int, dtype: torch.dtype = torch.float32) -> ICLBatch:
    """The fixed test prompts for ``seed``."""
    return sample_linear_regression(config.test_examples, dim=config.dim, length=config.length,
                                    noise_variance=config.noise_variance, beta_scale=config.beta_scale,
                                    generator=torch.Generator().manual_seed(20_000 + seed), dtype=dtype)

