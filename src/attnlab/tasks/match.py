"""Match3 and Match2: the triple-wise and pair-wise detection tasks.

From Sanford, Hsu & Telgarsky, "Representational Strengths and Limitations of Transformers",
arXiv 2306.02896, as used by Alman & Song, "How to Capture Higher-order Correlations? Generalizing
Matrix Softmax Attention to Kronecker Computation", arXiv 2310.04064 (tensor attention solves Match3
with small width; standard attention needs large width). Inferred (our reading of the papers):
the indices ``j, k`` range over all positions, ``i`` itself and ``j = k`` included.

- Match2: ``y_i = 1`` iff there is a ``j`` with ``x_i + x_j ≡ 0 (mod M)``.
- Match3: ``y_i = 1`` iff there are ``j, k`` with ``x_i + x_j + x_k ≡ 0 (mod M)``.

Worked example, ``M = 10``, ``x = [2, 7, 1, 5]``::

    match2 labels: [0, 0, 0, 1]    (only 5 + 5 = 10)
    match3 labels: [1, 1, 1, 0]    (2 + 7 + 1 = 10 serves 2, 7 and 1; 5 would need two terms summing to 5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MatchConfig", "match_labels", "sample_match"]


@dataclass(frozen=True)
class MatchConfig:
    """One Match setting: ``order`` 3 or 2, sequence ``length``, ``modulus`` M and the training recipe.

    The default modulus puts the share of positive Match3 labels near one half at length 16
    (measured: 0.52); Match2 at length 16 needs ``modulus=24`` for the same (0.52).
    """

    order: int = 3
    length: int = 16
    modulus: int = 185
    dim: int = 64
    depth: int = 1
    heads: int = 4
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    test_examples: int = 2000


def match_labels(x: torch.Tensor, *, modulus: int, order: int) -> torch.Tensor:
    """Labels ``[n, N]`` (int64, 0/1) of Match2 (``order=2``) or Match3 (``order=3``) for ``x [n, N]``."""
    if order not in (2, 3):
        raise ValueError(f"order={order} must be 2 (Match2) or 3 (Match3)")
    if x.ndim != 2:
        raise ValueError(f"x must have shape [n, N], got {tuple(x.shape)}")
    residues = x.remainder(modulus)  # (n, N)
    present = torch.zeros(x.shape[0], modulus, dtype=torch.bool)  # which residues the other terms can sum to
    if order == 2:
        present.scatter_(1, residues, True)
    else:
        pair_sums = (residues[:, :, None] + residues[:, None, :]).remainder(modulus).flatten(1)  # (n, N*N)
        present.scatter_(1, pair_sums, True)
    needed = (-residues).remainder(modulus)  # (n, N)
    return present.gather(1, needed).long()


def sample_match(num_examples: int, *, length: int, modulus: int, order: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``x [n, length]`` uniform in ``Z_modulus``, ``y`` its Match labels."""
    if length < 1 or modulus < 2:
        raise ValueError(f"length={length} must be positive and modulus={modulus} at least 2")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x = torch.randint(modulus, (num_examples, length), generator=generator)
    return x, match_labels(x, modulus=modulus, order=order)
