"""ShortConvolution: the gated form equals its loop transcription, causal (no look-ahead) or centred, the
recurrent step equals the full pass, gradients flow, bad input is refused."""

from __future__ import annotations

import pytest
import torch

from attnlab.nn.short_conv import ShortConvolution, short_conv_layer_indices


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(seed), dtype=torch.float64).to(dtype)


def conv_layer(dim: int, kernel_size: int, *, causal: bool, seed: int = 0) -> ShortConvolution:
    torch.manual_seed(seed)
    layer = ShortConvolution(dim, kernel_size, causal=causal).double()
    with torch.no_grad():  # non-zero biases everywhere, so a wrong offset or a dropped term shows
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=seeded(seed + 1), dtype=p.dtype))
    return layer


def loop_transcription(layer: ShortConvolution, u: torch.Tensor) -> torch.Tensor:
    """``y_t = (sum_k w_k u_{t+k-offset} + b) * (W u_t + c) + u_t`` with zeros outside the sequence, one t and
    one tap at a time (offset K-1 causal, K//2 centred)."""
    B, N, D = u.shape
    K = layer.kernel_size
    w, b = layer.conv.weight[:, 0], layer.conv.bias  # (D, K), (D,)
    offset = K - 1 if layer.causal else K // 2
    out = torch.zeros_like(u)
    for t in range(N):
        acc = b.expand(B, D).clone()
        for tap in range(K):
            s = t + tap - offset
            if 0 <= s < N:
                acc = acc + w[:, tap] * u[:, s]
        out[:, t] = acc * (u[:, t] @ layer.projection.weight.T + layer.projection.bias) + u[:, t]
    return out


# centred kernels are odd (even sizes are refused: test_bad_input_is_refused)
@pytest.mark.parametrize("causal,K", [(True, K) for K in (1, 2, 3, 4, 5)] + [(False, K) for K in (1, 3, 5)],
                         ids=lambda x: ("causal" if x else "centred") if isinstance(x, bool) else f"K{x}")
def test_forward_equals_the_loop_transcription(causal: bool, K: int) -> None:
    layer = conv_layer(6, K, causal=causal, seed=K)
    u = rand(3, 11, 6, seed=10 + K)
    out = layer(u)
    expected = loop_transcription(layer, u).detach()
    assert (out - expected).abs().max() < 1e-12
    out32 = layer.float()(u.float()).detach()
    assert out32.dtype == torch.float32
    assert float((out32.double() - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("K", [2, 3, 4])
def test_causal_convolution_does_not_look_ahead(K: int) -> None:
    layer = conv_layer(5, K, causal=True, seed=3)
    u = rand(2, 16, 5, seed=4)
    out = layer(u)
    for t in (0, 7, 14):
        changed = u.clone()
        changed[:, t + 1:] += 3 * rand(2, 15 - t, 5, seed=t)
        again = layer(changed)
        torch.testing.assert_close(again[:, : t + 1], out[:, : t + 1], rtol=0, atol=0)
        # the next position does see the change (through the current tap and, for K > 1, the past taps)
        assert (again[:, t + 1] - out[:, t + 1]).abs().max() > 1e-3
    # the past reaches exactly K - 1 positions ahead: a change at s moves outputs s .. s + K - 1 only
    changed = u.clone()
    changed[:, 5] += 1.0
    diff = (layer(changed) - out).abs().amax(dim=(0, 2))  # (N,)
    moved = (diff > 1e-12).nonzero().flatten().tolist()
    assert moved == list(range(5, 5 + K))


def test_centred_convolution_reaches_k_over_2_each_side() -> None:
    layer = conv_layer(4, 5, causal=False, seed=5)
    u = rand(2, 12, 4, seed=6)
    changed = u.clone()
    changed[:, 6] += 1.0
    diff = (layer(changed) - layer(u)).abs().amax(dim=(0, 2))  # (N,)
    assert (diff > 1e-12).nonzero().flatten().tolist() == [4, 5, 6, 7, 8]


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_recurrent_step_equals_the_full_pass(K: int) -> None:
    layer = conv_layer(6, K, causal=True, seed=7)
    u = rand(2, 13, 6, seed=8)
    full = layer(u)
    state = None
    steps = []
    for t in range(u.shape[1]):
        y, state = layer.step(u[:, t:t + 1], state)
        steps.append(y)
        assert state.shape == (2, K - 1, 6)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-12
    # the state is the last K - 1 inputs, and continuing from it equals running the longer sequence
    torch.testing.assert_close(state, u[:, u.shape[1] - (K - 1):], rtol=0, atol=0)
    extra = rand(2, 1, 6, seed=9)
    y, _ = layer.step(extra, state)
    torch.testing.assert_close(y, layer(torch.cat([u, extra], dim=1))[:, -1:], rtol=1e-12, atol=1e-12)
    assert layer.state_size == (K - 1) * 6


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
def test_gradients_flow_to_input_and_parameters(causal: bool) -> None:
    layer = conv_layer(3, 3, causal=causal, seed=11)
    u = rand(2, 6, 3, seed=12).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (u,), eps=1e-6, atol=1e-6, rtol=1e-5)
    layer.zero_grad()
    u.grad = None
    layer(u).square().sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("make,error,words", [
    (lambda: ShortConvolution(8, 0), ValueError, "kernel_size must be a positive integer"),
    (lambda: ShortConvolution(8, 2.0), ValueError, "kernel_size must be a positive integer"),
    (lambda: ShortConvolution(0, 3), ValueError, "dim must be a positive integer"),
    (lambda: ShortConvolution(8, 4, causal=False), ValueError, "must be odd"),
    (lambda: ShortConvolution(8, 3, causal=1), TypeError, "causal must be a bool"),
    (lambda: ShortConvolution(8, 3)(torch.randn(2, 5, 7)), ValueError, r"\[B, N, dim=8\]"),
    (lambda: ShortConvolution(8, 3).step(torch.randn(2, 2, 8)), ValueError, "one token"),
    (lambda: ShortConvolution(8, 3).step(torch.randn(2, 1, 8), torch.randn(2, 3, 8)), ValueError, "last K-1"),
    (lambda: ShortConvolution(8, 3, causal=False).step(torch.randn(2, 1, 8)), NotImplementedError, "no step"),
    (lambda: short_conv_layer_indices("last", 2), ValueError, "'all', 'first'"),
    (lambda: short_conv_layer_indices((0, 2), 2), ValueError, "0..1"),
    (lambda: short_conv_layer_indices([0], 2), ValueError, "tuple of block indices"),
])
def test_bad_input_is_refused(make, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        make()


def test_layer_indices() -> None:
    assert short_conv_layer_indices("all", 3) == (0, 1, 2)
    assert short_conv_layer_indices("first", 3) == (0,)
    assert short_conv_layer_indices((2, 0), 3) == (0, 2)
