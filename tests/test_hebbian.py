"""The associative-memory (Hebbian) view of linear attention: retrieval vs the 1/sqrt(1 + (P-1)/d_k) law."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import linear_attention
from attnlab.tasks import hebbian_capacity, predicted_cosine


def test_linear_attention_reads_the_hebbian_memory() -> None:
    """linear_attention(identity, no normaliser) returns M q with M = sum_i v_i k_i^T, built here by hand."""
    g = torch.Generator().manual_seed(0)
    keys, values, queries = (torch.randn(1, 1, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    M = sum(torch.outer(values[0, 0, i], keys[0, 0, i]) for i in range(7))  # (d_v, d_k)
    out = linear_attention(queries, keys, values, feature_map="identity", normalize=False)
    torch.testing.assert_close(out[0, 0], queries[0, 0] @ M.T)


def test_orthonormal_keys_retrieve_exactly() -> None:
    """The worked example of the module: orthonormal keys, no crosstalk, r(k_j) = v_j."""
    keys = torch.eye(4, dtype=torch.float64)[:2][None, None]  # k_1 = e_1, k_2 = e_2
    values = torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)[None, None]
    out = linear_attention(keys, keys, values, feature_map="identity", normalize=False)
    torch.testing.assert_close(out, values)


def test_a_single_pair_is_retrieved_perfectly() -> None:
    result = hebbian_capacity(32, 1, trials=5)
    assert result.cosine == pytest.approx(1.0, abs=1e-12) and result.accuracy == 1.0


@pytest.mark.parametrize("d_k,P", [(16, 16), (64, 64), (64, 200), (256, 64)])
def test_retrieval_cosine_follows_the_crosstalk_prediction(d_k: int, P: int) -> None:
    result = hebbian_capacity(d_k, P, trials=30, seed=1)
    assert result.predicted_cosine == pytest.approx(1 / (1 + (P - 1) / d_k) ** 0.5)
    assert abs(result.cosine - result.predicted_cosine) < 0.03, result


def test_more_pairs_interfere_and_wider_keys_store_more() -> None:
    accuracy = [hebbian_capacity(16, P, trials=20, seed=2).accuracy for P in (4, 16, 64, 256)]
    assert accuracy[0] == 1.0 and all(a > b for a, b in zip(accuracy, accuracy[1:], strict=False))
    cosines = [hebbian_capacity(d, 64, trials=10, seed=3).cosine for d in (16, 64, 256)]
    assert cosines[0] < cosines[1] < cosines[2]
    assert predicted_cosine(16, 64) < predicted_cosine(64, 64)


def test_same_seed_same_result_and_bad_arguments() -> None:
    assert hebbian_capacity(16, 8, trials=3, seed=4) == hebbian_capacity(16, 8, trials=3, seed=4)
    assert hebbian_capacity(16, 8, trials=3, seed=4) != hebbian_capacity(16, 8, trials=3, seed=5)
    for kwargs in ({"d_k": 0, "num_pairs": 3}, {"d_k": 8, "num_pairs": -1}, {"d_k": 8, "num_pairs": 2, "trials": 0},
                   {"d_k": 8.0, "num_pairs": 2}):
        with pytest.raises(ValueError, match="must be a positive int"):
            hebbian_capacity(**kwargs)
