"""Non-finite keys and values reach exactly the rows that can see them (``attnlab.ops.nonfinite``).

The conformance suites check every causal op, impl and layer for the rows *before* a non-finite key;
here: the visibility rules themselves against the dense masks, rows *after* a local window, states,
gradients, masks and the fast check.
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.ops import linear_attention, neighborhood_mask, sliding_window_attention, sliding_window_mask
from attnlab.ops.neighborhood import neighborhood_attention
from attnlab.ops.nonfinite import (
    guard_nonfinite_sequence,
    index_reach,
    mask_reach,
    nonfinite_positions,
    window_reach,
)
from attnlab.ops.softmax import softmax_attention


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_bad(B: int, H: int, M: int, seed: int) -> torch.Tensor:
    return torch.rand(B, H, M, generator=seeded(seed)) < 0.15


@pytest.mark.parametrize("window,causal,sinks", [(1, True, 0), (4, True, 0), (4, True, 2), (7, False, 0),
                                                 (4, False, 0), (40, True, 3)])
def test_window_reach_is_the_sliding_window_mask(window: int, causal: bool, sinks: int) -> None:
    N = 23
    mask = sliding_window_mask(N, window, causal=causal, sink_tokens=sinks)  # (N, N)
    reach = (window_reach(window - 1, 0, sink_tokens=sinks) if causal else window_reach(window // 2, window // 2))
    for seed in range(5):
        bad = random_bad(2, 3, N, seed)
        assert torch.equal(reach(bad), mask_reach(mask)(bad))


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal", [
    ((17,), 4, 1, 1, False), ((17,), 5, 2, 3, True), ((4, 5), (3, 2), (1, 2), 1, (True, False)),
    ((3, 4, 5), 2, 1, (1, 2, 2), False),
])
def test_neighbour_reach_is_the_natten_mask(shape, kernel, stride, dilation, causal) -> None:
    from attnlab.ops.neighborhood import _Grid

    grid = _Grid(shape, kernel, stride, dilation, causal)
    keys, valid = grid.neighbours(torch.arange(grid.length))
    mask = neighborhood_mask(shape, kernel, stride=stride, dilation=dilation, causal=causal)
    for seed in range(5):
        bad = random_bad(2, 2, grid.length, seed)
        assert torch.equal(index_reach(keys, valid)(bad), mask_reach(mask)(bad))


@pytest.mark.parametrize("impl", ["gather", "reference"])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_rows_past_the_window_stay_finite(impl: str, causal: bool) -> None:
    """Rows whose window misses a NaN key are the clean result, rows that see it are NaN (no more, no less)."""
    B, H, N, D, window, t = 2, 4, 30, 8, 5, 11
    q, k, v = (torch.randn(B, H if i == 0 else 2, N, D, generator=seeded(i), dtype=torch.float64) for i in range(3))
    k2 = k.clone()
    k2[1, 0, t, 3] = float("nan")
    out = sliding_window_attention(q, k2, v, window=window, causal=causal, impl=impl)
    clean = k.clone()
    clean[1, 0, t] = 0  # what the op computes on for the rows that cannot see key t
    expected = sliding_window_attention(q, clean, v, window=window, causal=causal, impl="reference")
    sees = sliding_window_mask(N, window, causal=causal)[:, t]  # (N,)
    assert torch.isnan(out[1, :2][:, sees]).all()  # query heads 0, 1 share kv head 0
    torch.testing.assert_close(out[1, :2][:, ~sees], expected[1, :2][:, ~sees], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-12, atol=1e-12)  # another sequence
    torch.testing.assert_close(out[1, 2:], expected[1, 2:], rtol=1e-12, atol=1e-12)  # another kv head
    assert sees.sum() < N - 5  # the window left rows on both sides (for causal: after) finite


def test_neighborhood_2d_rows_outside_the_neighbourhood_stay_finite() -> None:
    shape, kernel, t = (5, 6), 3, 14
    q, k, v = (torch.randn(1, 2, 30, 8, generator=seeded(i), dtype=torch.float64) for i in range(3))
    v2 = v.clone()
    v2[0, 1, t, 0] = float("inf")
    out = neighborhood_attention(q, k, v2, kernel_size=kernel, shape=shape)
    sees = neighborhood_mask(shape, kernel)[:, t]
    clean = v.clone()
    clean[0, 1, t] = 0
    expected = neighborhood_attention(q, k, clean, kernel_size=kernel, shape=shape, impl="reference")
    assert torch.isnan(out[0, 1, sees]).all()
    torch.testing.assert_close(out[0, 1, ~sees], expected[0, 1, ~sees], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0, 0], expected[0, 0], rtol=1e-12, atol=1e-12)


def test_padded_nonfinite_key_reaches_no_row() -> None:
    """A key the padding mask hides is seen by no row: a NaN there changes nothing."""
    q, k, v = (torch.randn(2, 2, 9, 4, generator=seeded(i), dtype=torch.float64) for i in range(3))
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[0, 7:] = False
    v2 = v.clone()
    v2[0, :, 8] = float("nan")
    for causal in (False, True):
        expected = softmax_attention(q, k, v, causal=causal, key_padding_mask=padding)
        out = softmax_attention(q, k, v2, causal=causal, key_padding_mask=padding)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_returned_state_that_absorbed_a_nan_is_nan() -> None:
    q, k, v = (torch.randn(2, 2, 12, 4, generator=seeded(i), dtype=torch.float64) for i in range(3))
    k2 = k.clone()
    k2[0, 1, 5, 0] = float("nan")
    _, (S, z) = linear_attention(q, k2, v, causal=True, return_state=True)
    _, (S_clean, z_clean) = linear_attention(q, k, v, causal=True, return_state=True)
    assert torch.isnan(S[0, 1]).all() and torch.isnan(z[0, 1]).all()
    torch.testing.assert_close(S[1], S_clean[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S[0, 0], S_clean[0, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mechanism", ["softmax", "sliding_window", "lightning", "hip"])
def test_gradients_of_earlier_rows_ignore_a_later_nan(mechanism: str) -> None:
    record = attnlab.get(mechanism)
    from attnlab.testing import random_qkv, run_options

    q, k, v = random_qkv(record, dtype=torch.float64, generator=seeded(3), requires_grad=True)
    options = run_options(record, causal=True)
    t = q.shape[2] // 2

    def grads(k_in: torch.Tensor) -> list[torch.Tensor]:
        out = record(q, k_in, v, **options)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out[:, :, :t].square().sum(), (q, k_in, v))

    bad = k.detach().clone()
    bad[:, :, t + 1, 0] = float("nan")
    bad.requires_grad_(True)
    clean = grads(k)
    poisoned = grads(bad)
    for name, a, b in zip("qkv", poisoned, clean, strict=True):
        assert torch.isfinite(a).all(), f"{mechanism}: NaN gradient reached {name}"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fast_check_finds_exact_positions_and_ignores_overflowing_sums() -> None:
    x = torch.full((1, 2, 6, 3), 3e38)  # finite, but the sum overflows float32
    assert nonfinite_positions(x, x) is None
    y = torch.randn(1, 2, 6, 3)
    y[0, 1, 4, 2] = float("-inf")
    bad = nonfinite_positions(x, y)
    assert bad is not None and bad.shape == (1, 2, 6) and bad.sum() == 1 and bad[0, 1, 4]


@pytest.mark.parametrize("causal", [True, False])
def test_layer_guard_rows(causal: bool) -> None:
    """The layer guard: causal rows from the first bad token on, bidirectional the whole sequence, NaN."""
    x = torch.randn(2, 7, 4, dtype=torch.float64, generator=seeded(1))
    x[0, 3, 1] = float("nan")
    out = guard_nonfinite_sequence(lambda x: x.cumsum(dim=1) if causal else x.sum(1, keepdim=True).expand_as(x),
                                   x, causal=causal)
    assert torch.isfinite(out[1]).all()
    if causal:
        assert torch.isnan(out[0, 3:]).all() and torch.isfinite(out[0, :3]).all()
    else:
        assert torch.isnan(out[0]).all()
