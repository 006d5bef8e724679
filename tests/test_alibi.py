"""ALiBi slopes (arXiv 2108.12409): one function, the paper's rule for every head count, used by both ops."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import alibi_bias, lightning_decay_slopes
from attnlab.ops.alibi import alibi_slopes


def paper_slopes(heads: int) -> list[float]:
    """Written out from the paper's rule: 2^(-8 (h+1) / P) for the closest lower power of two P, then the
    odd multiples 2^(-8 (2i+1) / (2P)) of 2P heads for the H - P heads left."""
    P = 1
    while 2 * P <= heads:
        P *= 2
    first = [2.0 ** (-8.0 * (h + 1) / P) for h in range(P)]
    rest = [2.0 ** (-8.0 * (2 * i + 1) / (2 * P)) for i in range(heads - P)]
    return first + rest


def test_twelve_heads_follow_the_paper() -> None:
    expected = [2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]
    assert paper_slopes(12) == pytest.approx(expected, rel=1e-15)
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 9, 12, 16, 24, 40, 64])
def test_every_head_count_follows_the_paper(heads: int) -> None:
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(paper_slopes(heads), dtype=torch.float64),
                               rtol=1e-15, atol=0)
    assert alibi_slopes(heads, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("heads", [6, 12, 16])
def test_flashbias_and_lightning_use_the_same_slopes(heads: int) -> None:
    slopes = alibi_slopes(heads)
    bias = alibi_bias(heads, 5)  # (1, H, n, m): -m_h (i - j)
    torch.testing.assert_close(-bias[0, :, 4, 3], slopes)  # distance 1
    torch.testing.assert_close(lightning_decay_slopes(heads), (slopes * (1 + 1e-5)).float())


def test_bad_head_counts_raise() -> None:
    with pytest.raises(ValueError, match="heads"):
        alibi_slopes(0)
    with pytest.raises(TypeError, match="heads"):
        alibi_slopes(2.0)  # type: ignore[arg-type]
