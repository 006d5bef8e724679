"""DMA (dynamic mask attention): top-k selection by the key bias, identities, gather == reference, the layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.nn import DynamicMaskAttention
from attnlab.ops import dynamic_mask_attention, dynamic_mask_select, softmax_attention


def inputs(N: int, M: int, *, seed: int, heads: int = 4, kv_heads: int = 2,
           batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, N, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, M, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, M, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(batch, kv_heads, M, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, bias


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("N,M", [(20, 20), (9, 20)])
def test_window_covering_all_keys_is_softmax_with_additive_key_bias(causal: bool, N: int, M: int) -> None:
    q, k, v, bias = inputs(N, M, seed=0)
    mask = bias.repeat_interleave(2, dim=1)[:, :, None, :].expand(2, 4, N, M)  # (B, H, N, M) additive
    expected = softmax_attention(q, k, v, causal=causal, attn_mask=mask)
    for k_budget in (M, M + 7):
        for impl in ("reference", "gather", "block"):
            out = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=k_budget, causal=causal, impl=impl)
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_selection_keeps_the_largest_allowed_biases() -> None:
    g = torch.Generator().manual_seed(1)
    B, Hkv, N, M, W = 2, 3, 7, 12, 4
    bias = torch.randn(B, Hkv, M, generator=g)
    index, kept = dynamic_mask_select(bias, N, k_budget=W, causal=True)
    assert index.shape == kept.shape == (B, Hkv, N, W)
    for b in range(B):
        for h in range(Hkv):
            for i in range(N):
                visible = list(range(i + (M - N) + 1))
                best = sorted(visible, key=lambda j: -float(bias[b, h, j]))[:W]
                chosen = {int(j) for j, ok in zip(index[b, h, i], kept[b, h, i], strict=True) if ok}
                assert chosen == set(best), (b, h, i)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("N,M,window", [(30, 30, 5), (11, 30, 8), (64, 64, 2)])
def test_gather_equals_reference_forward_and_backward(causal: bool, N: int, M: int, window: int) -> None:
    q, k, v, bias = inputs(N, M, seed=N + window)
    grad = torch.randn(2, 4, N, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for impl in ("reference", "gather", "block"):
        out = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=window, causal=causal, impl=impl)
        results.append((out, *torch.autograd.grad((out * grad).sum(), (q, k, v, bias))))
    for expected, actual in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    assert results[1][4].abs().sum() > 0  # the bias is differentiated
    for expected, actual in zip(results[0], results[2], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_unselected_keys_get_no_bias_gradient() -> None:
    """Selection is not differentiated: keys kept by no query get a zero bias gradient."""
    q, k, v, bias = inputs(6, 40, seed=3, batch=1, kv_heads=4)
    out = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=3, causal=False)
    (grad,) = torch.autograd.grad(out.square().sum(), bias)
    index, kept = dynamic_mask_select(bias, 6, k_budget=3, causal=False)
    used = torch.zeros_like(bias, dtype=torch.bool).scatter_(-1, index.flatten(2), True)
    assert (grad[~used] == 0).all() and (grad[used] != 0).all()


def test_bad_key_bias_raises_naming_it() -> None:
    q, k, v, bias = inputs(6, 6, seed=4)
    with pytest.raises(ValueError, match="key_bias"):
        dynamic_mask_attention(q, k, v, key_bias=bias[..., :5], k_budget=3, causal=True)
    with pytest.raises(ValueError, match="k_budget"):
        dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=0, causal=True)


def test_layer_bias_comes_from_the_values_and_a_starts_at_zero() -> None:
    torch.manual_seed(0)
    layer = DynamicMaskAttention(32, 4, kv_heads=2, k_budget=5, causal=True).double()
    assert torch.equal(layer.A.detach(), torch.zeros(2, dtype=torch.float64))
    with torch.no_grad():
        layer.A.copy_(torch.tensor([0.7, -1.3]))
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    q = layer.to_q(x).reshape(2, 12, 4, 8).transpose(1, 2)
    k, v = layer.to_kv(x).reshape(2, 12, 2, 2, 8).permute(2, 0, 3, 1, 4)
    dt = layer.dt_proj(v.transpose(1, 2).reshape(2, 12, 16))  # (B, N, H_kv)
    bias = (layer.A * F.softplus(dt)).transpose(1, 2)  # (B, H_kv, N)
    out = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=5, causal=True, impl="reference")
    expected = layer.to_out(out.transpose(1, 2).reshape(2, 12, 32))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_layer_gradients_reach_a_and_dt_proj() -> None:
    torch.manual_seed(1)
    layer = DynamicMaskAttention(16, 2, k_budget=4).double()
    layer(torch.randn(3, 10, 16, dtype=torch.float64)).square().sum().backward()
    assert layer.A.grad.abs().sum() > 0  # A = 0 at init: the gradient reaches A ...
    assert layer.dt_proj.weight.grad.abs().sum() == 0  # ... and not yet dt_proj (A * softplus')
    layer.zero_grad()
    with torch.no_grad():
        layer.A.fill_(0.5)
    layer(torch.randn(3, 10, 16, dtype=torch.float64)).square().sum().backward()
    assert layer.dt_proj.weight.grad.abs().sum() > 0


def test_registered_as_a_mixer_layer() -> None:
    record = attnlab.get("dynamic_mask")
    assert record.layer is DynamicMaskAttention and record.role == "mixer"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("N,M,k_budget", [
    pytest.param(100, 100, 7, id="N100-k7"),  # several blocks of 16 queries, budget < block
    pytest.param(90, 150, 40, id="N90-M150-k40"),  # memory keys before the first query
    pytest.param(70, 70, 70, id="N70-k70"),  # budget = every key
    pytest.param(33, 200, 300, id="N33-M200-k300"),  # budget above M
])
def test_block_path_equals_reference_forward_and_backward(causal: bool, N: int, M: int, k_budget: int) -> None:
    """The blocked candidate lists select exactly the reference's keys (float64, values and grads)."""
    q, k, v, bias = inputs(N, M, seed=N + k_budget)
    grad = torch.randn(2, 4, N, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for impl in ("reference", "block"):
        out = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=k_budget, causal=causal, impl=impl)
        results.append((out, *torch.autograd.grad((out * grad).sum(), (q, k, v, bias))))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_ties_in_the_bias_go_to_the_earlier_key_on_every_path(causal: bool) -> None:
    """A bias with many equal values (the layer's A = 0 start makes them all equal): every path
    keeps the same keys, the earliest among equals."""
    q, k, v, _ = inputs(80, 80, seed=11)
    g = torch.Generator().manual_seed(12)
    bias = torch.randint(0, 3, (2, 2, 80), generator=g).to(torch.float64)  # three distinct values
    expected = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=9, causal=causal, impl="reference")
    for impl in ("gather", "block"):
        out = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=9, causal=causal, impl=impl)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    flat = torch.zeros(2, 2, 80, dtype=torch.float64)  # all equal: query i keeps keys 0 .. 8
    index, kept = dynamic_mask_select(flat, 80, k_budget=9, causal=True)
    assert torch.equal(index[0, 0, 50][kept[0, 0, 50]].sort().values, torch.arange(9))
    out = dynamic_mask_attention(q, k, v, key_bias=flat, k_budget=9, causal=True, impl="block")
    prefix = softmax_attention(q[:, :, 50:51], k[:, :, :9], v[:, :, :9])  # query 50 sees keys 0..8
    torch.testing.assert_close(out[:, :, 50:51], prefix, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_block_path_float32_at_length_1024(causal: bool) -> None:
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 4, 1024, 32, generator=g) for _ in range(3))
    bias = torch.randn(1, 4, 1024, generator=g)
    expected = dynamic_mask_attention(q.double(), k.double(), v.double(), key_bias=bias.double(), k_budget=128,
                                      causal=causal, impl="reference")
    out = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=128, causal=causal, impl="block")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_block_path_bfloat16_at_a_realistic_length() -> None:
    """bf16 inputs at N=4096, k_budget=512 (GQA): close to the float64 reference of the same bf16 values."""
    g = torch.Generator().manual_seed(22)
    q = torch.randn(1, 4, 4096, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 4096, 64, generator=g).bfloat16() for _ in range(2))
    bias = torch.randn(1, 2, 4096, generator=g)  # float32 bias: no ties among the selected keys
    expected = dynamic_mask_attention(q.double(), k.double(), v.double(), key_bias=bias.double(), k_budget=512,
                                      causal=True, impl="reference")
    out = dynamic_mask_attention(q, k, v, key_bias=bias, k_budget=512, causal=True)  # auto = block
    assert out.dtype == torch.bfloat16
    error = float((out.double() - expected).norm() / expected.norm())
    assert error < 1e-2, error
