"""Minimal attention (arXiv 2410.13732): collapsed == product, symmetric scores, no V/O (spec 15)."""

from __future__ import annotations

import pytest
import torch

from attnlab.nn import MinimalAttention, MinimalBlock


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("value_output", [True, False], ids=["with-vo", "no-vo"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_collapsed_initialised_from_the_product_gives_the_same_outputs(causal: bool, value_output: bool) -> None:
    torch.manual_seed(0)
    layer = MinimalAttention(12, 3, similarity="qk", value_output=value_output, causal=causal).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    collapsed = layer.collapsed()
    assert collapsed.similarity == "collapsed" and collapsed.w_qk.shape == (3, 12, 12)
    torch.testing.assert_close(collapsed.scores(x), layer.scores(x))
    torch.testing.assert_close(collapsed(x), layer(x))


def test_product_scores_are_x_wq_wk_x() -> None:
    torch.manual_seed(1)
    layer = MinimalAttention(8, 2, similarity="qk").double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    for h in range(2):
        q, k = x[0] @ layer.w_q[h], x[0] @ layer.w_k[h]  # (N, d)
        torch.testing.assert_close(layer.scores(x)[0, h], q @ k.T / 4**0.5)


@pytest.mark.parametrize("rank", [None, 3], ids=["triangle", "low-rank"])
def test_symmetric_scores_are_symmetric(rank: int | None) -> None:
    torch.manual_seed(2)
    layer = MinimalAttention(10, 2, similarity="symmetric", symmetric_rank=rank).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, 6, 10, dtype=torch.float64)
    S = layer.scores(x)
    torch.testing.assert_close(S, S.transpose(-1, -2))
    assert not torch.allclose(S, torch.zeros_like(S))
    W = layer.similarity_matrix()
    torch.testing.assert_close(W, W.transpose(1, 2))


def test_symmetric_form_has_half_the_parameters_and_no_vo_drops_them() -> None:
    dim, heads = 16, 4
    collapsed = MinimalAttention(dim, heads, similarity="collapsed", value_output=False)
    symmetric = MinimalAttention(dim, heads, similarity="symmetric", value_output=False)
    assert count(collapsed) == heads * dim * dim
    assert count(symmetric) == heads * dim * (dim + 1) // 2
    full = MinimalAttention(dim, heads, similarity="qk")
    assert count(full) == 2 * heads * dim * (dim // heads) + 2 * dim * dim  # W_Q, W_K, W_V, W_O
    assert not hasattr(MinimalAttention(dim, heads, value_output=False), "to_v")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_without_v_and_o_uniform_scores_average_the_inputs(causal: bool) -> None:
    layer = MinimalAttention(6, 2, similarity="collapsed", value_output=False, causal=causal).double()
    with torch.no_grad():
        layer.w_qk.zero_()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    if causal:
        expected = x.cumsum(1) / torch.arange(1, 6, dtype=torch.float64)[None, :, None]
    else:
        expected = x.mean(1, keepdim=True).expand_as(x)
    torch.testing.assert_close(layer(x), expected)
    summed = MinimalAttention(6, 2, similarity="collapsed", value_output=False, causal=causal,
                              head_combine="sum").double()
    with torch.no_grad():
        summed.w_qk.zero_()
    torch.testing.assert_close(summed(x), 2 * expected)


def test_block_is_residual_attention_without_mlp_and_bad_options_raise() -> None:
    torch.manual_seed(3)
    block = MinimalBlock(8, 2, similarity="symmetric").double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), x + block.attention(block.norm(x)))
    with pytest.raises(ValueError, match="similarity='cosine'"):
        MinimalAttention(8, 2, similarity="cosine")
    with pytest.raises(ValueError, match="symmetric_rank=2"):
        MinimalAttention(8, 2, similarity="qk", symmetric_rank=2)
    with pytest.raises(ValueError, match="collapsed"):
        MinimalAttention(8, 2, similarity="symmetric").collapsed()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("options", [
    pytest.param({"similarity": "qk"}, id="qk"),
    pytest.param({"similarity": "collapsed"}, id="collapsed"),
    pytest.param({"similarity": "symmetric"}, id="symmetric"),
    pytest.param({"similarity": "symmetric", "symmetric_rank": 3}, id="symmetric-rank3"),
    pytest.param({"similarity": "collapsed", "value_output": False}, id="collapsed-no-vo"),
    pytest.param({"similarity": "qk", "value_output": False, "head_combine": "sum"}, id="qk-no-vo-sum"),
])
def test_sdpa_forward_equals_the_explicit_probabilities(causal: bool, options: dict) -> None:
    """The fused forward (SDPA) equals softmax of :meth:`scores` times the values, with gradients."""
    torch.manual_seed(7)
    layer = MinimalAttention(12, 3, causal=causal, **options).double()
    x = torch.randn(2, 17, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 17, 12, dtype=torch.float64)
    results = []
    for form in (layer.forward_explicit, layer.forward):
        out = form(x)
        results.append((out, *torch.autograd.grad((out * grad).sum(), (x, *layer.parameters()))))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_sdpa_forward_float32_and_bfloat16_at_length_1024() -> None:
    torch.manual_seed(8)
    layer = MinimalAttention(64, 4, similarity="collapsed", causal=True)
    x = torch.randn(1, 1024, 64)
    with torch.no_grad():
        expected = layer.double().forward_explicit(x.double())
        torch.testing.assert_close(layer.float()(x).double(), expected, rtol=1e-5, atol=1e-5)
        out = layer.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert float((out.double() - expected).norm() / expected.norm()) < 2e-2
