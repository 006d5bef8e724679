"""LAMA (arXiv 1912.00835): low-rank affinities to the global context, padding, invariances (spec 13)."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.nn import LowRankAttentionPooling


@pytest.mark.parametrize("rank", [1, 2])
def test_pooling_equals_the_written_out_formula(rank: int) -> None:
    torch.manual_seed(rank)
    B, N, dim, heads = 2, 6, 5, 3
    layer = LowRankAttentionPooling(dim, heads, rank=rank).double()
    x = torch.randn(B, N, dim, dtype=torch.float64)
    out = layer(x)
    U, V = layer.context_factors, layer.token_factors
    for b in range(B):
        c = [sum(x[b, j, i].item() for j in range(N)) / N for i in range(dim)]
        f = [[sum(math.tanh(sum(U[k, i, r].item() * c[i] for i in range(dim))
                            * sum(V[k, i, r].item() * x[b, j, i].item() for i in range(dim)))
                  for r in range(rank)) for j in range(N)] for k in range(heads)]
        for j in range(N):  # L2-normalise across heads
            norm = math.sqrt(sum(f[k][j] ** 2 for k in range(heads)))
            for k in range(heads):
                f[k][j] /= norm
        for k in range(heads):
            e = [math.exp(v) for v in f[k]]
            a = [v / sum(e) for v in e]
            expected = [sum(a[j] * x[b, j, i].item() for j in range(N)) for i in range(dim)]
            torch.testing.assert_close(out[b, k], torch.tensor(expected, dtype=torch.float64))


def test_padding_gets_no_weight_and_matches_the_unpadded_sequence() -> None:
    torch.manual_seed(3)
    layer = LowRankAttentionPooling(8, 4).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    A = layer.attention(x, mask)
    assert (A[0, :, 6:] == 0).all()
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    torch.testing.assert_close(layer(x, mask)[0], layer(x[:1, :6])[0])
    torch.testing.assert_close(layer(x, mask)[1], layer(x[1:])[0])


def test_pooling_is_invariant_to_token_order() -> None:
    torch.manual_seed(4)
    layer = LowRankAttentionPooling(8, 2, rank=2).double()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    perm = torch.randperm(7)
    torch.testing.assert_close(layer(x[:, perm]), layer(x))


def test_output_layer_and_bad_arguments() -> None:
    layer = LowRankAttentionPooling(8, 3, out_features=5)
    assert layer(torch.randn(2, 4, 8)).shape == (2, 5)
    with pytest.raises(NotImplementedError, match="causal"):
        LowRankAttentionPooling(8, 3, causal=True)
    with pytest.raises(ValueError, match="rank=0"):
        LowRankAttentionPooling(8, 3, rank=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool))
