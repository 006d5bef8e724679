"""HiP attention: dense limit, given blocks == masked softmax over them, the hierarchical search, gather == ref."""

from __future__ import annotations

import pytest
import torch

from attnlab.nn import Attention
from attnlab.ops import hip_attention, hip_select_blocks, softmax_attention
from attnlab.ops.hip import hip_select_blocks_vectorized


def inputs(N: int, M: int, *, seed: int, heads: int = 4, kv_heads: int = 2, scale: float = 1.0,
           ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, heads, N, 8, generator=g, dtype=torch.float64) * scale).requires_grad_()
    k = (torch.randn(2, kv_heads, M, 8, generator=g, dtype=torch.float64) * scale).requires_grad_()
    v = torch.randn(2, kv_heads, M, 6, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("N,M,bq,bk,window,sinks", [(40, 40, 8, 2, 4, 2), (17, 50, 4, 4, 0, 0),
                                                    (33, 33, 32, 1, 16, 4)])
def test_budget_covering_the_keys_is_dense_causal_attention(N, M, bq, bk, window, sinks) -> None:
    q, k, v = inputs(N, M, seed=0)
    expected = softmax_attention(q, k, v, causal=True)
    for impl in ("reference", "gather"):
        out = hip_attention(q, k, v, k_budget=M, block_size_q=bq, block_size_k=bk, window=window,
                            sink_tokens=sinks, impl=impl)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_given_blocks_give_masked_softmax_over_exactly_those_blocks() -> None:
    N = M = 24
    bq, bk = 6, 3
    q, k, v = inputs(N, M, seed=1, kv_heads=4)
    g = torch.Generator().manual_seed(2)
    starts = torch.randint(0, M // bk, (2, 4, N // bq, 3), generator=g) * bk
    starts[0, 0, 1, 2] = -1  # "no block" entries are allowed
    mask = torch.zeros(2, 4, N, M, dtype=torch.bool)
    for b in range(2):
        for h in range(4):
            for i in range(N):
                for s in starts[b, h, i // bq].tolist():
                    for j in range(s, s + bk) if s >= 0 else ():
                        mask[b, h, i, j] = j <= i
    empty = ~mask.any(-1, keepdim=True)
    expected = softmax_attention(q, k, v, attn_mask=mask | empty).masked_fill(empty, 0.0)
    for impl in ("reference", "gather"):
        out = hip_attention(q, k, v, block_starts=starts, block_size_q=bq, block_size_k=bk, window=0,
                            sink_tokens=0, impl=impl)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def spike_keys(M: int, block_size_k: int, increasing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q = e_0 and keys whose block score (max over the block) is monotone in the block index."""
    q = torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.randn(1, 1, M, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.01
    block = torch.arange(M) // block_size_k
    k[0, 0, :, 0] = (block if increasing else -block).double()
    return q, k


@pytest.mark.parametrize("increasing", [True, False], ids=["increasing", "decreasing"])
@pytest.mark.parametrize("M,bk,budget", [(64, 2, 8), (100, 1, 6), (96, 4, 12)])
def test_search_finds_the_exact_top_blocks_when_scores_are_monotone(increasing, M, bk, budget) -> None:
    q, k = spike_keys(M, bk, increasing)
    starts = hip_select_blocks(q, k, k_budget=budget, block_size_q=4, block_size_k=bk, window=0)
    K = budget // bk
    candidates = M  # last query at position M - 1, no window
    blocks = -(-candidates // bk)
    expected = list(range(blocks - K, blocks)) if increasing else list(range(K))
    assert starts.shape == (1, 1, 1, K)
    assert starts[0, 0, 0].tolist() == [b * bk for b in expected]


def test_selection_is_sorted_distinct_and_inside_the_candidates() -> None:
    q, k, _ = inputs(64, 200, seed=4)
    bq, bk, budget, window = 16, 4, 32, 24
    starts = hip_select_blocks(q, k, k_budget=budget, block_size_q=bq, block_size_k=bk, window=window)
    assert starts.shape == (2, 4, 4, budget // bk)
    for g in range(4):
        last = (g + 1) * bq - 1 + (200 - 64)
        row = starts[:, :, g]
        assert (row >= 0).all() and (row % bk == 0).all() and (row < last + 1 - window).all()
        assert (row[..., 1:] > row[..., :-1]).all()


@pytest.mark.parametrize("N,M,bq,bk,budget,window,sinks", [(40, 40, 8, 2, 8, 4, 2), (30, 70, 4, 3, 9, 5, 3),
                                                           (64, 64, 16, 1, 6, 0, 1)])
def test_gather_equals_reference_forward_and_backward(N, M, bq, bk, budget, window, sinks) -> None:
    q, k, v = inputs(N, M, seed=5)
    options = dict(k_budget=budget, block_size_q=bq, block_size_k=bk, window=window, sink_tokens=sinks)
    grad = torch.randn(2, 4, N, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    results = []
    for impl in ("reference", "gather"):
        out = hip_attention(q, k, v, impl=impl, **options)
        results.append((out, *torch.autograd.grad((out * grad).sum(), (q, k, v))))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(results[0][0], softmax_attention(q, k, v, causal=True))  # really sparse


def test_causal_only_and_bad_options() -> None:
    q, k, v = inputs(8, 8, seed=7)
    with pytest.raises(NotImplementedError, match="causal"):
        hip_attention(q, k, v, causal=False)
    with pytest.raises(ValueError, match="k_budget=0"):
        hip_attention(q, k, v, k_budget=0)
    with pytest.raises(ValueError, match="block_starts"):
        hip_attention(q, k, v, block_starts=torch.zeros(2, 4, 5, 1, dtype=torch.long), block_size_q=2)


def test_drop_in_for_softmax_in_a_trained_layer() -> None:
    """Training-free: a softmax layer's weights run HiP unchanged; a full budget reproduces the layer."""
    torch.manual_seed(0)
    dense = Attention(32, 4, mechanism="softmax", causal=True).double()
    sparse = Attention(32, 4, mechanism="hip", causal=True, k_budget=64, block_size_q=8,
                                  window=8, sink_tokens=2).double()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-10, atol=1e-10)
        sparse.options["k_budget"] = 16  # a real budget: close to, not equal to, the dense layer
        error = float((sparse(x) - dense(x)).norm() / dense(x).norm())
    assert 0 < error < 0.5


@pytest.mark.parametrize("N,M,bq,bk,budget,window,stride", [
    pytest.param(200, 200, 8, 2, 12, 8, 2, id="N200-bq8-bk2-k12"),
    pytest.param(75, 300, 16, 4, 20, 0, 1, id="N75-M300-bq16-bk4-k20"),  # partial last query block
    pytest.param(64, 64, 4, 1, 64, 4, 2, id="N64-budget-covers"),
])
def test_vectorised_search_equals_the_per_block_search(N, M, bq, bk, budget, window, stride) -> None:
    """Every query block searched at once selects the same key blocks as the loop over query blocks."""
    q, k, _ = inputs(N, M, seed=N + M)
    options = dict(k_budget=budget, block_size_q=bq, block_size_k=bk, window=window, query_stride=stride)
    expected = hip_select_blocks(q, k, **options)
    actual = hip_select_blocks_vectorized(q, k, **options)
    assert torch.equal(actual, expected)
    assert (expected >= 0).any()


def test_gather_float32_and_bfloat16_at_realistic_lengths() -> None:
    """The default options at N=2048 (float32: 1e-5 of the float64 reference) and bf16 at N=4096."""
    g = torch.Generator().manual_seed(30)
    for N, dtype, tolerance in ((2048, torch.float32, 1e-5), (4096, torch.bfloat16, 1e-2)):
        q, k, v = (torch.randn(1, 4, N, 64, generator=g).to(dtype) for _ in range(3))
        out = hip_attention(q, k, v)  # auto = gather, default k_budget=512, window=128
        starts = hip_select_blocks(q.double(), k.double())  # fixes the selection for the reference
        expected = hip_attention(q.double(), k.double(), v.double(), block_starts=starts, impl="reference")
        assert out.dtype == dtype
        error = float((out.double() - expected).norm() / expected.norm())
        assert error < tolerance, (N, dtype, error)
