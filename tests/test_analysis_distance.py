"""Attention distance, entropy, WAAD / FAI and head classification (analysis spec A3.3, A4.7)."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.analysis import distance as dist


def _causal_uniform(N):
    return torch.tril(torch.ones(N, N, dtype=torch.float64)) / torch.arange(1, N + 1, dtype=torch.float64)[:, None]


def test_identity_over_patches_has_distance_zero_and_all_mass_on_ring_zero():
    G = 4
    d = dist.grid_distance(G)
    identity = torch.eye(G * G, dtype=torch.float64)[None, None]
    profile = dist.distance_profile(identity, d, reduce="mean")
    assert profile[0, 0] == 1 and profile[0, 1:].abs().max() == 0
    assert dist.mean_attention_distance(identity, distance=d)[0] == 0
    assert dist.local_ratio(identity, d, radius=0)[0] == 1


def test_uniform_attention_over_the_grid_gives_flat_mean_profile_and_ring_counts_for_sum():
    G = 5
    d = dist.grid_distance(G)
    uniform = torch.full((1, 1, G * G, G * G), 1.0 / G ** 2, dtype=torch.float64)
    mean_profile = dist.distance_profile(uniform, d, reduce="mean")
    torch.testing.assert_close(mean_profile[0], torch.full((G,), 1.0 / G ** 2, dtype=torch.float64))
    # ring counts by enumeration for the interior query (2, 2): 1, 8, 16
    query = 2 * G + 2
    counts = [sum(1 for j in range(G * G) if max(abs(2 - j // G), abs(2 - j % G)) == delta) for delta in range(3)]
    assert counts == [1, 8, 16]
    mass = (uniform[0, 0, query][None, :] * (d[query][None, :] == torch.arange(3)[:, None])).sum(-1)
    torch.testing.assert_close(mass, torch.tensor(counts, dtype=torch.float64) / G ** 2)
    # "sum" averages the per-query ring mass over the queries that have that ring
    sum_profile = dist.distance_profile(uniform, d, reduce="sum")
    ring0 = 1 / G ** 2
    assert sum_profile[0, 0].item() == pytest.approx(ring0)
    for delta in range(G):
        having = [q for q in range(G * G) if (d[q] == delta).any()]
        expected = sum(int((d[q] == delta).sum()) for q in having) / len(having) / G ** 2
        assert sum_profile[0, delta].item() == pytest.approx(expected)


def test_grid_metrics():
    d = dist.grid_distance(3, metric="manhattan")
    assert d[0, 8] == 4 and dist.grid_distance(3)[0, 8] == 2
    assert dist.grid_distance(3, metric="euclidean_round")[0, 8] == round(math.sqrt(8))
    with pytest.raises(ValueError, match="metric"):
        dist.grid_distance(3, metric="cosine")


def test_previous_token_head_distance_and_waad_are_one():
    N = 12
    prev = torch.zeros(N, N, dtype=torch.float64)
    prev[0, 0] = 1
    prev[torch.arange(1, N), torch.arange(N - 1)] = 1
    assert dist.backward_distance(prev, rows=slice(1, None)).item() == pytest.approx(1.0)
    torch.testing.assert_close(dist.waad(prev)[1:], torch.ones(N - 1, dtype=torch.float64))
    assert dist.mean_attention_distance(prev[None], queries=slice(1, None))[0] == pytest.approx(1.0)


def test_attend_to_bos_head():
    N = 25
    bos = torch.zeros(N, N, dtype=torch.float64)
    bos[:, 0] = 1
    assert dist.backward_distance(bos).item() == pytest.approx(sum(range(N)) / N)
    torch.testing.assert_close(dist.waad(bos, window=10),
                               torch.tensor([min(t, 10) for t in range(N)], dtype=torch.float64))


def test_uniform_causal_waad_at_t3_is_1_5():
    w = dist.waad(_causal_uniform(20), window=10)
    assert w[3].item() == pytest.approx(1.5)
    t = 15
    assert w[t].item() == pytest.approx(sum(min(delta, 10) for delta in range(t + 1)) / (t + 1))


def test_fai_finds_the_anchor_column():
    N, s0 = 60, 7
    g = torch.Generator().manual_seed(0)
    group = torch.rand(N, N, generator=g, dtype=torch.float64).tril()
    group = group / group.sum(-1, keepdim=True)
    for t in range(s0 + 10, N):
        rest = group[t].clone()
        rest[s0] = 0
        group[t] = rest / rest.sum() * 0.5
        group[t, s0] = 0.5
    values = dist.fai(group, h_lo=10, h_hi=100)
    assert values[s0].item() == pytest.approx(0.5)
    assert int(torch.nan_to_num(values, nan=-1).argmax()) == s0
    assert torch.isnan(values[N - 5])  # no t >= s + 10 left


def test_classification_takes_bottom_and_top_30_percent():
    d = torch.arange(10, dtype=torch.float64)[torch.randperm(10, generator=torch.Generator().manual_seed(1))]
    classes = dist.classify_heads(d.view(2, 5))
    assert sorted(float(d.view(2, 5)[pair]) for pair in classes.local) == [0, 1, 2]
    assert sorted(float(d.view(2, 5)[pair]) for pair in classes.global_) == [7, 8, 9]
    maps = torch.rand(2, 5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(dist.group_map(maps, [(0, 1), (1, 2)]), (maps[0, 1] + maps[1, 2]) / 2)


def test_entropy_of_uniform_and_one_hot_rows():
    N = 8
    uniform = torch.full((1, 2, N, N), 1.0 / N, dtype=torch.float64)
    assert dist.attention_entropy(uniform)[0].item() == pytest.approx(math.log(N))
    assert dist.attention_entropy(uniform, normalized=True)[1].item() == pytest.approx(1.0)
    one_hot = torch.eye(N, dtype=torch.float64)[None, None]
    assert dist.attention_entropy(one_hot)[0].item() == pytest.approx(0.0, abs=1e-12)
    causal = _causal_uniform(N)[None, None]
    assert dist.attention_entropy(causal, normalized=True, queries=slice(1, None))[0].item() == pytest.approx(1.0)


def test_token_distance_mean_for_random_rows_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64), -1)
    expected = torch.zeros(3, dtype=torch.float64)
    for h in range(3):
        total = 0.0
        for b in range(2):
            for i in range(5):
                total += sum(probs[b, h, i, j].item() * abs(i + 2 - j) for j in range(7))
        expected[h] = total / 10
    torch.testing.assert_close(dist.mean_attention_distance(probs), expected)
