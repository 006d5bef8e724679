"""ALiBi head slopes, the one definition every op that needs them uses (flashbias biases, lightning decay).

"Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation" (Press et
al., arXiv 2108.12409), section 3: head ``h`` of ``H`` adds ``-m_h (i - j)`` to the score of query ``i``
and key ``j``, with the geometric sequence ``m_h = 2^(-8 (h + 1) / H)`` (``h = 0..H-1``) when ``H`` is a
power of two. For other ``H`` the paper's code takes the ``P`` slopes of the closest lower power of two
``P``, then every other slope of ``2P`` (those not already among the first ``P``) until there are ``H``.
TransNormerLLM (arXiv 2307.14995) and lightning attention use the same slopes as decay rates.
"""

from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes"]


def _power_of_two_slopes(heads: int) -> list[float]:
    # m_h = 2^(-8 (h + 1) / H): a geometric sequence whose first term is also its ratio
    return [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)]


def alibi_slopes(heads: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The ALiBi slope ``m_h`` of every head, ``[H]`` (arXiv 2108.12409, section 3).

    ``H`` a power of two: ``m_h = 2^(-8 (h + 1) / H)``. Otherwise, with ``P`` the largest power of two
    below ``H``: the ``P`` slopes of ``P`` heads, then slopes ``0, 2, 4, ...`` of ``2P`` heads (that is
    ``2^(-8 (2i + 1) / (2P))``) for the remaining ``H - P`` heads. H=12 gives ``2^-1 .. 2^-8`` then
    ``2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5``.

    Args:
        heads: ``H >= 1``.
        dtype, device: of the returned tensor (computed in float64, then cast).
    """
    if isinstance(heads, bool) or not isinstance(heads, int):
        raise TypeError(f"heads must be an int, got {type(heads).__name__}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got heads={heads}")
    closest = 2 ** math.floor(math.log2(heads))
    slopes = _power_of_two_slopes(closest)
    if closest != heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float64, device=device).to(dtype)
