"""GAAM (arXiv 2401.11143): the reference code's weights, padding handling, heads and mixtures (spec 11)."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.nn import GaussianAdaptiveAttention, GaussianAdaptiveMixer, MultiHeadGaussianAdaptiveAttention


def set_parameters(layer: GaussianAdaptiveAttention, offsets: list[float], scales: list[float]) -> None:
    with torch.no_grad():
        layer.mean_offsets.copy_(torch.tensor(offsets, dtype=torch.float64))
        layer.c.copy_(torch.tensor(scales, dtype=torch.float64))


def test_single_gaussian_is_a_normalised_density_of_the_standardised_values() -> None:
    torch.manual_seed(0)
    layer = GaussianAdaptiveAttention(1, 1, 1).double()
    set_parameters(layer, [0.3], [0.8])
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    out, weights = layer(x, return_attention_details=True)
    for b in range(2):
        for f in range(5):
            column = x[b, :, f].tolist()
            mean = sum(column) / 9
            var = sum((v - mean) ** 2 for v in column) / 8 + 1e-8  # unbiased
            g = [math.exp(-((v - mean - 0.3) / math.sqrt(var)) ** 2 / (2 * 0.64)) for v in column]
            expected = torch.tensor([gi / sum(g) for gi in g], dtype=torch.float64)
            torch.testing.assert_close(weights[b, :, f], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, x * weights)


def test_product_of_gaussians_is_one_gaussian_with_the_combined_precision() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 11, 4, dtype=torch.float64)
    product = GaussianAdaptiveAttention(1, 1, 3).double()
    set_parameters(product, [0.0, 0.0, 0.0], [0.7, 1.3, 2.1])
    single = GaussianAdaptiveAttention(1, 1, 1).double()
    combined = sum(c**-2 for c in (0.7, 1.3, 2.1)) ** -0.5
    set_parameters(single, [0.0], [combined])
    torch.testing.assert_close(product(x), single(x), rtol=1e-10, atol=1e-12)


def test_sum_mixture_adds_the_densities() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    mixture = GaussianAdaptiveAttention(1, 1, 2, mixture="sum").double()
    set_parameters(mixture, [0.5, -0.5], [0.9, 1.4])
    parts = []
    for offset, scale in ((0.5, 0.9), (-0.5, 1.4)):
        one = GaussianAdaptiveAttention(1, 1, 1).double()
        set_parameters(one, [offset], [scale])
        _, w = one(x, return_attention_details=True)
        # undo the normalisation of each part: w * sum(g) = g
        z = (x - x.mean(1, keepdim=True) - offset) / (x.var(1, keepdim=True) + 1e-8).sqrt()
        g = torch.exp(-z**2 / (2 * scale**2)) / math.sqrt(2 * math.pi * scale**2)
        torch.testing.assert_close(w, g / g.sum(1, keepdim=True))
        parts.append(g)
    total = parts[0] + parts[1]
    _, weights = mixture(x, return_attention_details=True)
    torch.testing.assert_close(weights, total / total.sum(1, keepdim=True))


def test_padding_values_pass_through_and_are_zeroed_for_the_statistics() -> None:
    torch.manual_seed(3)
    pad = -100.0
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    x[0, 7:] = pad
    layer = GaussianAdaptiveAttention(1, 1, 2, pad).double()
    out = layer(x)
    torch.testing.assert_close(out[0, 7:], x[0, 7:])  # passed through unchanged
    # the code's rule: statistics of the sequence with the padding replaced by zeros (still counted),
    # densities of the actual values, normalised over every position
    zeroed = torch.where(x == pad, torch.zeros_like(x), x)
    mean, var = zeroed.mean(1, keepdim=True), zeroed.var(1, keepdim=True) + 1e-8
    w = torch.ones_like(x)
    for offset, scale in zip(layer.mean_offsets.tolist(), layer.c.tolist(), strict=True):
        z = (x - mean - offset) / var.sqrt()
        w = w * torch.exp(-z**2 / (2 * scale**2)) / math.sqrt(2 * math.pi * scale**2)
    w = w / w.sum(1, keepdim=True)
    torch.testing.assert_close(out[0, :7], (x * w)[0, :7], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[1], (x * w)[1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out[0, :7], layer(torch.where(x == pad, torch.zeros_like(x), x))[0, :7])


def test_multi_head_splits_the_axis_into_chunks_last_takes_the_remainder() -> None:
    torch.manual_seed(4)
    layer = MultiHeadGaussianAdaptiveAttention(1, 3, 2).double()
    x = torch.randn(2, 11, 4, dtype=torch.float64)  # chunks 3, 3, 5
    out = layer(x)
    for head, (start, stop) in zip(layer.attention_heads, ((0, 3), (3, 6), (6, 11)), strict=True):
        torch.testing.assert_close(out[:, start:stop], head(x[:, start:stop]))
    assert not torch.allclose(out[:, :3], layer.attention_heads[0](x[:, :4])[:, :3])  # chunk statistics matter


def test_mixer_mixes_tokens_within_chunks_and_checks_its_arguments() -> None:
    torch.manual_seed(5)
    mixer = GaussianAdaptiveMixer(8, 2).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    out = mixer(x)
    x2 = x.clone()
    x2[:, 9] += 1.0  # a token in the second chunk
    out2 = mixer(x2)
    torch.testing.assert_close(out2[:, :5], out[:, :5])
    assert not torch.allclose(out2[:, 5:9], out[:, 5:9])
    with pytest.raises(NotImplementedError, match="causal"):
        GaussianAdaptiveMixer(8, 2, causal=True)
    with pytest.raises(ValueError, match="num_heads=2"):
        mixer(torch.randn(2, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="mixture"):
        GaussianAdaptiveAttention(1, 1, 2, mixture="max")
    with pytest.raises(ValueError, match="num_gaussians"):
        GaussianAdaptiveAttention(1, 1, 0)
    with pytest.raises(ValueError, match="norm_axis"):
        GaussianAdaptiveAttention(3, 1, 2)(torch.randn(2, 5))
