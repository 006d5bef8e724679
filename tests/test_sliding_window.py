"""Sliding-window attention: the band rule, identities, gather == dense reference (forward and backward)."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import neighborhood_attention, sliding_window_attention, sliding_window_mask, softmax_attention
from attnlab.ops.sliding_window import _band_blocks


def test_mask_is_the_band_of_the_definition() -> None:
    N = 11
    for window in (1, 2, 3, 4, 7, 20):
        causal = sliding_window_mask(N, window, causal=True)
        bidir = sliding_window_mask(N, window, causal=False)
        for i in range(N):
            for j in range(N):
                assert bool(causal[i, j]) == (0 <= i - j < window), (window, i, j)
                assert bool(bidir[i, j]) == (abs(i - j) <= window // 2), (window, i, j)


def random_qkv(N: int, *, seed: int, heads: int = 4, kv_heads: int = 2, dv: int = 6,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, N, 8, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, N, 8, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, N, dv, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("N,window", [(17, 1), (17, 4), (40, 9), (300, 64), (33, 50)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_gather_equals_reference_forward_and_backward(N: int, window: int, causal: bool) -> None:
    q, k, v = random_qkv(N, seed=N + window)
    grad = torch.randn(2, 4, N, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = []
    for impl in ("reference", "gather"):
        out = sliding_window_attention(q, k, v, window=window, causal=causal, impl=impl)
        outs.append((out, *torch.autograd.grad((out * grad).sum(), (q, k, v))))
    for expected, actual in zip(*outs, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_window_covering_the_sequence_is_plain_attention() -> None:
    q, k, v = random_qkv(23, seed=1)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=23, causal=True),
                               softmax_attention(q, k, v, causal=True), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=46, causal=False),
                               softmax_attention(q, k, v), rtol=1e-10, atol=1e-10)
    narrow = sliding_window_attention(q, k, v, window=3, causal=True)
    assert not torch.allclose(narrow, softmax_attention(q, k, v, causal=True))


def test_causal_window_is_causal_1d_neighborhood() -> None:
    q, k, v = random_qkv(31, seed=2)
    for window in (2, 5, 16):
        torch.testing.assert_close(sliding_window_attention(q, k, v, window=window, causal=True),
                                   neighborhood_attention(q, k, v, kernel_size=window, causal=True),
                                   rtol=1e-10, atol=1e-10)


def test_memory_is_linear_in_n() -> None:
    N, window = 8192, 128
    key_index, allowed = _band_blocks(N, window, True, torch.device("cpu"))
    G, Bq, S = allowed.shape
    assert S == Bq + window - 1 and G * Bq >= N
    assert allowed.numel() < 4 * N * window < N * N // 10


@pytest.mark.parametrize("window,error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_window_raises(window: object, error: type[Exception]) -> None:
    q, k, v = random_qkv(8, seed=3)
    with pytest.raises(error, match="window"):
        sliding_window_attention(q, k, v, window=window, causal=True)


def test_cross_lengths_are_refused() -> None:
    q, k, v = random_qkv(8, seed=4)
    with pytest.raises(ValueError, match="M=7"):
        sliding_window_attention(q, k[:, :, :7], v[:, :, :7], window=3, causal=True)


def test_sink_mask_is_the_streaming_llm_rule() -> None:
    N = 13
    for window, sinks in ((1, 1), (3, 2), (4, 4), (6, 9)):
        mask = sliding_window_mask(N, window, causal=True, sink_tokens=sinks)
        for i in range(N):
            for j in range(N):
                assert bool(mask[i, j]) == (0 <= i - j < window or (j < sinks and j <= i)), (window, sinks, i, j)


def test_end_aligned_mask_is_the_last_rows_of_the_square_mask() -> None:
    full = sliding_window_mask(20, 5, causal=True, sink_tokens=3)
    for N in (1, 4, 20):
        torch.testing.assert_close(sliding_window_mask(N, 5, causal=True, sink_tokens=3, key_length=20), full[20 - N:])
    with pytest.raises(ValueError, match="key_length"):
        sliding_window_mask(4, 5, causal=False, key_length=20)


@pytest.mark.parametrize("N,window,sinks", [(17, 1, 1), (40, 9, 4), (300, 64, 4), (33, 50, 2), (70, 5, 40)])
def test_sinks_gather_equals_reference_forward_and_backward(N: int, window: int, sinks: int) -> None:
    q, k, v = random_qkv(N, seed=10 * N + sinks)
    grad = torch.randn(2, 4, N, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for impl in ("reference", "gather"):
        out = sliding_window_attention(q, k, v, window=window, causal=True, sink_tokens=sinks, impl=impl)
        outs.append((out, *torch.autograd.grad((out * grad).sum(), (q, k, v))))
    for expected, actual in zip(*outs, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_sinks_equal_softmax_with_the_explicit_mask_and_change_the_output() -> None:
    q, k, v = random_qkv(50, seed=5)
    mask = torch.zeros(50, 50, dtype=torch.bool)
    for i in range(50):
        mask[i, max(0, i - 7):i + 1] = True
        mask[i, :min(3, i + 1)] = True
    out = sliding_window_attention(q, k, v, window=8, causal=True, sink_tokens=3)
    torch.testing.assert_close(out, softmax_attention(q, k, v, attn_mask=mask), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, sliding_window_attention(q, k, v, window=8, causal=True))


def test_sinks_float32_and_flex_forward() -> None:
    q, k, v = (t.detach().float() for t in random_qkv(96, seed=6))
    expected = sliding_window_attention(q.double(), k.double(), v.double(), window=16, causal=True, sink_tokens=4,
                                        impl="reference")
    for impl in ("gather", "flex"):
        out = sliding_window_attention(q, k, v, window=16, causal=True, sink_tokens=4, impl=impl)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks,causal,error", [(-1, True, ValueError), (2.0, True, TypeError),
                                                (True, True, TypeError), (2, False, ValueError)])
def test_bad_sink_tokens_raise(sinks: object, causal: bool, error: type[Exception]) -> None:
    q, k, v = random_qkv(8, seed=7)
    for impl in ("reference", "gather"):
        with pytest.raises(error, match="sink_tokens"):
            sliding_window_attention(q, k, v, window=3, causal=causal, sink_tokens=sinks, impl=impl)
