"""Task generators: shapes, label rules on hand-made and generated examples, baselines against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.tasks import incontext_regression as icl
from attnlab.tasks.digits import load_digits_split
from attnlab.tasks.match import match_labels, sample_match
from attnlab.tasks.mqar import IGNORE_INDEX, multiquery_ar
from attnlab.tasks.needle import NEEDLE, QUERY, sample_needle
from attnlab.tasks.wikitext import bits_per_byte, load_wikitext_split, sample_windows


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- MQAR


def test_mqar_layout_and_label_rule() -> None:
    vocab, length, pairs = 64, 32, 4
    inputs, labels = multiquery_ar(200, vocab_size=vocab, seq_len=length, num_pairs=pairs, generator=_gen(1))
    assert inputs.shape == labels.shape == (200, length) and inputs.dtype == labels.dtype == torch.int64
    assert int(inputs.min()) >= 0 and int(inputs.max()) < vocab
    for row_in, row_label in zip(inputs, labels, strict=True):
        keys, values = row_in[0:2 * pairs:2], row_in[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and bool((keys >= 1).all()) and bool((keys < vocab // 2).all())
        assert bool((values >= vocab // 2).all())
        answer_positions = (row_label != IGNORE_INDEX).nonzero().flatten()
        assert len(answer_positions) == pairs and bool((answer_positions >= 2 * pairs).all())
        lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for t in answer_positions.tolist():
            assert (t - 2 * pairs) % 2 == 0  # queries sit at even offsets of the query region
            assert row_label[t].item() == lookup[row_in[t].item()]  # the answer is the value of the queried key
        assert sorted(row_in[answer_positions].tolist()) == sorted(keys.tolist())  # each key is queried once


def test_mqar_without_filler_matches_the_worked_example_and_gaps_follow_the_power_law() -> None:
    inputs, labels = multiquery_ar(3, vocab_size=20, seq_len=16, num_pairs=2, random_non_queries=False,
                                   generator=_gen(3))
    assert inputs[0].tolist() == [7, 14, 8, 10, 7, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0]
    assert labels[0].tolist() == [-100] * 4 + [14] + [-100] * 7 + [10] + [-100] * 3
    # non-query positions of the query region are 0 without filler
    _, labels = multiquery_ar(2000, vocab_size=256, seq_len=64, num_pairs=4, random_non_queries=False,
                              generator=_gen(4))
    gaps = ((labels != IGNORE_INDEX).nonzero()[:, 1] - 8) // 2  # (2000 * 4,) in [0, 28)
    counts = torch.bincount(gaps, minlength=28).double()
    p = 0.01 * torch.arange(1, 29, dtype=torch.float64) ** (0.01 - 1)
    # with replacement-free sampling the first slots are taken almost always: compare the first slot and the tail
    assert counts[0] / 2000 > 0.3 and counts[:7].sum() > counts[21:].sum()
    assert float(p[0] / p.sum()) > 0.1  # the power law itself is front-loaded


def test_mqar_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="seq_len=15 must be even"):
        multiquery_ar(1, vocab_size=64, seq_len=15, num_pairs=2)
    with pytest.raises(ValueError, match="vocab_size=16 must be larger than seq_len=16"):
        multiquery_ar(1, vocab_size=16, seq_len=16, num_pairs=2)
    with pytest.raises(ValueError, match="num_pairs=5 must be between 1 and seq_len/4=4"):
        multiquery_ar(1, vocab_size=64, seq_len=16, num_pairs=5)


# ----------------------------------------------------------------------------------------------- Match


def test_match_labels_on_hand_made_examples() -> None:
    x = torch.tensor([[2, 7, 1, 5], [3, 3, 4, 9]])
    assert match_labels(x, modulus=10, order=2).tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]
    # row 2: 3 + 3 + 4 = 10 serves 3, 3 and 4; the pair sums (mod 10) are {6, 7, 2, 8, 3}, and 9 needs 1
    assert match_labels(x, modulus=10, order=3).tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]


def test_match_labels_agree_with_brute_force() -> None:
    x, y3 = sample_match(40, length=7, modulus=41, order=3, generator=_gen(5))
    y2 = match_labels(x, modulus=41, order=2)
    for row, labels3, labels2 in zip(x.tolist(), y3.tolist(), y2.tolist(), strict=True):
        n = len(row)
        brute3 = [int(any((row[i] + row[j] + row[k]) % 41 == 0 for j in range(n) for k in range(n))) for i in range(n)]
        brute2 = [int(any((row[i] + row[j]) % 41 == 0 for j in range(n))) for i in range(n)]
        assert labels3 == brute3 and labels2 == brute2
    assert 0.2 < float(y3.float().mean()) < 0.9  # both classes occur
    with pytest.raises(ValueError, match="order=4 must be 2"):
        match_labels(x, modulus=41, order=4)


# ----------------------------------------------------------------------------------------------- in-context regression


def test_icl_generator_shapes_tokens_and_second_moment() -> None:
    batch = icl.sample_linear_regression(20000, dim=5, length=40, noise_variance=0.1, generator=_gen(6),
                                         dtype=torch.float64)
    assert batch.tokens.shape == (20000, 41, 6) and batch.target.shape == (20000,)
    torch.testing.assert_close(batch.tokens[:, :40, :5], batch.x)
    torch.testing.assert_close(batch.tokens[:, :40, 5], batch.y)
    torch.testing.assert_close(batch.tokens[:, 40, :5], batch.x_query)
    assert bool((batch.tokens[:, 40, 5] == 0).all())
    # E[y^2] = E[|beta|^2] + sigma^2 = 1 + 0.1 for beta ~ N(0, I/d)
    assert abs(float((batch.y ** 2).mean()) / 1.1 - 1) < 0.05
    residual = batch.y - torch.einsum("nld,nd->nl", batch.x, batch.beta)
    assert abs(float(residual.var()) / 0.1 - 1) < 0.05
    with pytest.raises(ValueError, match="beta_scale='2'"):
        icl.sample_linear_regression(2, beta_scale="2")


def test_ridge_equals_its_closed_form_and_recovers_beta_without_noise() -> None:
    batch = icl.sample_linear_regression(5, dim=3, length=12, noise_variance=0.1, generator=_gen(7),
                                         dtype=torch.float64)
    got = icl.ridge_predict(batch.x, batch.y, batch.x_query, ridge=0.3)
    for i in range(5):
        X, y, xq = batch.x[i].numpy(), batch.y[i].numpy(), batch.x_query[i].numpy()
        beta_hat = np.linalg.inv(X.T @ X + 0.3 * np.eye(3)) @ X.T @ y
        assert abs(got[i].item() - xq @ beta_hat) < 1e-10
    clean = icl.sample_linear_regression(50, dim=4, length=200, noise_variance=0.0, generator=_gen(8),
                                         dtype=torch.float64)
    estimate = icl.ridge_predict(clean.x, clean.y, clean.x_query, ridge=1e-9)
    truth = (clean.x_query * clean.beta).sum(-1)
    assert float((estimate - truth).abs().max()) < 1e-3


def test_one_step_gd_predictors_match_explicit_sums_and_the_fitted_step_is_optimal() -> None:
    batch = icl.sample_linear_regression(4, dim=3, length=6, generator=_gen(9), dtype=torch.float64)
    for debiased in (False, True):
        got = icl.one_step_gd_predict(batch.x, batch.y, batch.x_query, step=0.7, debiased=debiased)
        for i in range(4):
            mean = batch.x[i].mean(0) if debiased else torch.zeros(3, dtype=torch.float64)
            expected = 0.7 / 6 * sum(batch.y[i, l] * (batch.x[i, l] - mean) @ batch.x_query[i] for l in range(6))
            assert abs(got[i].item() - expected.item()) < 1e-12
    fit = icl.sample_linear_regression(3000, generator=_gen(10), dtype=torch.float64)
    step = icl.best_gd_step(fit)

    def mse(s: float) -> float:
        return float(((icl.one_step_gd_predict(fit.x, fit.y, fit.x_query, step=s) - fit.target) ** 2).mean())

    assert mse(step) < mse(step * 1.1) and mse(step) < mse(step * 0.9)


def test_baselines_order_ridge_below_gd_below_zero() -> None:
    losses = icl.baseline_losses(icl.ICLRegressionConfig(test_examples=4000), seed=0, fit_examples=4000)
    assert losses["ridge"] < losses["debiased_gd_one_step"] < losses["zero"]
    assert 0.09 < losses["ridge"] < 0.14 and 1.0 < losses["zero"] < 1.2  # ~0.115 and 1 + sigma^2


# ------------------------------------------------------------------------------- needle, digits, wikitext


def test_needle_answer_is_the_value_next_to_the_key() -> None:
    inputs, labels, depth = sample_needle(300, vocab_size=20, length=24, generator=_gen(11))
    rows = torch.arange(300)
    assert bool((inputs[rows, depth] == NEEDLE).all()) and bool((inputs[:, -2] == QUERY).all())
    assert bool((inputs[rows, depth + 1] == inputs[:, -1]).all())  # the query repeats the needle's key
    assert bool((labels[:, -1] == inputs[rows, depth + 2]).all())
    assert bool((labels[:, :-1] == IGNORE_INDEX).all())
    assert len(set(depth.tolist())) > 10


def test_digits_split_is_disjoint_and_seeded() -> None:
    a, b = load_digits_split(seed=0), load_digits_split(seed=0)
    assert a.train_images.shape[1:] == (1, 8, 8) and len(a.train_labels) + len(a.test_labels) == 1797
    torch.testing.assert_close(a.test_images, b.test_images)
    assert float(a.train_images.max()) == 1.0 and float(a.train_images.min()) == 0.0
    train = {tuple(x.flatten().tolist()) for x in a.train_images}
    overlap = sum(tuple(x.flatten().tolist()) in train for x in a.test_images)
    assert overlap < 5  # a handful of duplicate images exist in the data set itself
    assert not torch.equal(load_digits_split(seed=1).test_labels, a.test_labels)


def test_wikitext_windows_and_bits_per_byte() -> None:
    split = load_wikitext_split(seed=0)
    assert split.train.numel() > 1_000_000 and split.test.numel() > 100_000 and split.validation.numel() > 100_000
    inputs, targets = sample_windows(split.train, batch_size=4, length=16, generator=_gen(12))
    assert inputs.shape == targets.shape == (4, 16)
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    text = bytes(split.train[:2000].tolist()).decode("utf-8", errors="ignore")
    assert sum(c.isalpha() for c in text) > 1000  # it is text
