"""The associative-memory view of linear attention: how many key-value pairs one head can store.

"Understanding Transformers through the Lens of Pavlovian Conditioning" (Mu Qiao, arXiv 2508.08289):
keys are conditioned stimuli, values unconditioned stimuli, and one linear-attention call writes the
Hebbian memory ``M = sum_i v_i k_i^T`` and reads ``r(q) = M q = sum_i v_i (k_i . q)``.

Worked example (``d_k = 4``, two pairs, keys orthonormal so there is no crosstalk)::

    k_1 = [1, 0, 0, 0], v_1 = [0.6, 0.8];   k_2 = [0, 1, 0, 0], v_2 = [1, 0]
    M = v_1 k_1^T + v_2 k_2^T;   r(k_1) = M k_1 = v_1  (cosine 1, nearest stored value v_1)

With random unit keys, ``k_i . k_j`` has variance ``1 / d_k``, so retrieving pair ``j`` returns
``v_j`` plus crosstalk of squared norm ``~ (P - 1) / d_k``: the predicted retrieval cosine is
``1 / sqrt(1 + (P - 1) / d_k)`` (our derivation, inferred; not in the paper). The abstract's capacity
statement is ``O(sqrt(d_k))`` associations before interference degrades retrieval (worst case); the
average-case fidelity falls once ``P ~ d_k``. :func:`hebbian_capacity` measures both numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnlab.ops.linear import linear_attention

__all__ = ["HebbianCapacity", "hebbian_capacity", "predicted_cosine"]


@dataclass(frozen=True)
class HebbianCapacity:
    """Retrieval from a Hebbian (linear-attention) memory holding ``num_pairs`` random pairs.

    Attributes:
        d_k, num_pairs, trials, value_dim: the experiment.
        cosine: mean over trials and pairs of ``cos(M k_j, v_j)``; cosine_std: its standard deviation
            over trials (of the per-trial means).
        accuracy: fraction of pairs whose retrieval is nearest (by cosine) to its own stored value.
        exact_fraction: fraction of trials in which every pair was retrieved correctly.
        predicted_cosine: ``1 / sqrt(1 + (P - 1) / d_k)``.
    """

    d_k: int
    num_pairs: int
    trials: int
    value_dim: int
    cosine: float
    cosine_std: float
    accuracy: float
    exact_fraction: float
    predicted_cosine: float


def predicted_cosine(d_k: int, num_pairs: int) -> float:
    """``1 / sqrt(1 + (P - 1) / d_k)``: signal ``v_j`` against crosstalk of variance ``(P - 1) / d_k``."""
    return 1.0 / math.sqrt(1.0 + (num_pairs - 1) / d_k)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value


def hebbian_capacity(d_k: int, num_pairs: int, *, trials: int = 20, seed: int = 0,
                     value_dim: int | None = None) -> HebbianCapacity:
    """Store ``num_pairs`` random unit key-value pairs in a linear-attention memory and read them back.

    Each trial draws keys ``K [P, d_k]`` and values ``V [P, d_v]`` uniformly on the unit spheres,
    writes and reads with :func:`attnlab.ops.linear_attention` (identity feature map, no normaliser:
    ``R = K K^T V``, i.e. ``r_j = M k_j`` with ``M = V^T K``), and scores ``cos(r_j, v_j)`` and
    whether ``v_j`` is the stored value nearest to ``r_j``. All trials run as one batch (float64).

    Args:
        d_k: key dimension. num_pairs: ``P``. trials: independent memories. seed: of the generator.
        value_dim: ``d_v`` (default ``d_k``).
    """
    d_k, num_pairs, trials = (_positive_int(n, v) for n, v in (("d_k", d_k), ("num_pairs", num_pairs),
                                                              ("trials", trials)))
    value_dim = d_k if value_dim is None else _positive_int("value_dim", value_dim)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(trials, 1, num_pairs, d_k, generator=generator, dtype=torch.float64)
    values = torch.randn(trials, 1, num_pairs, value_dim, generator=generator, dtype=torch.float64)
    keys = keys / keys.norm(dim=-1, keepdim=True)  # (T, 1, P, d_k) unit keys (CS)
    values = values / values.norm(dim=-1, keepdim=True)  # (T, 1, P, d_v) unit values (US)
    # one linear-attention call = write every pair (Hebbian outer products), then query with each key
    retrieved = linear_attention(keys, keys, values, feature_map="identity", normalize=False, scale=1.0)
    r = retrieved[:, 0] / retrieved[:, 0].norm(dim=-1, keepdim=True)  # (T, P, d_v)
    similarity = torch.einsum("tpe,tqe->tpq", r, values[:, 0])  # cos(r_p, v_q): values are unit
    cosine = similarity.diagonal(dim1=1, dim2=2)  # (T, P)
    correct = similarity.argmax(dim=-1) == torch.arange(num_pairs)  # (T, P)
    per_trial = cosine.mean(dim=1)
    return HebbianCapacity(
        d_k=d_k, num_pairs=num_pairs, trials=trials, value_dim=value_dim,
        cosine=float(per_trial.mean()),
        cosine_std=float(per_trial.std()) if trials > 1 else 0.0,
        accuracy=float(correct.double().mean()),
        exact_fraction=float(correct.all(dim=1).double().mean()),
        predicted_cosine=predicted_cosine(d_k, num_pairs),
    )
