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
