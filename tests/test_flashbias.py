"""FlashBias: SDPA-concat == dense biased reference, no N x M tensor, exact / SVD factorizations, bf16 ALiBi."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import attnlab.ops.flashbias as flashbias_module
from attnlab.ops import (
    alibi_bias_factors,
    flashbias_attention,
    softmax_attention,
    spatial_distance_bias_factors,
    svd_bias_factors,
)


def dense_alibi(heads: int, n: int, m: int) -> torch.Tensor:
    """``-m_h (p_i - j)``, ``p_i = i + m - n``, slopes ``2^(-8 (h+1) / H)``, written out here."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)
    p = torch.arange(n, dtype=torch.float64) + (m - n)
    j = torch.arange(m, dtype=torch.float64)
    return -slopes[:, None, None] * (p[:, None] - j[None, :])  # (H, n, m)


def alibi_rows(heads: int, n: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of the square causal-ALiBi bias, ``[H, len(rows), n]``, without building all of it."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)
    j = torch.arange(n, dtype=torch.float64)
    return -slopes[:, None, None] * (rows.double()[:, None] - j[None, :])


def qkv(N: int, M: int, *, seed: int, heads: int = 4, kv_heads: int = 2, dv: int = 6, d: int = 8,
        dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(2, kv_heads, M, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(2, kv_heads, M, dv, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("N,M,causal,bias_heads", [(16, 16, True, (1, 1)), (16, 16, False, (4, 2)),
                                                   (9, 21, True, (4, 4)), (9, 21, False, (1, 4))])
def test_sdpa_equals_dense_reference_forward_and_backward(N, M, causal, bias_heads) -> None:
    q, k, v = qkv(N, M, seed=N + M)
    g = torch.Generator().manual_seed(1)
    q_bias = torch.randn(2, bias_heads[0], N, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k_bias = torch.randn(1, bias_heads[1], M, 3, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 4, N, 6, generator=g, dtype=torch.float64)
    results = []
    for impl in ("reference", "sdpa"):
        out = flashbias_attention(q, k, v, q_bias=q_bias, k_bias=k_bias, causal=causal, impl=impl)
        results.append((out, *torch.autograd.grad((out * grad).sum(), (q, k, v, q_bias, k_bias))))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    # and the reference is the biased softmax of the definition
    bias = torch.einsum("bhnr,bhmr->bhnm", q_bias, k_bias.repeat_interleave(4 // bias_heads[1], 1)
                        if bias_heads[1] not in (1, 4) else k_bias)
    plain = softmax_attention(q, k, v, causal=causal, attn_mask=bias.expand(2, 4, N, M))
    torch.testing.assert_close(results[0][0], plain, rtol=1e-10, atol=1e-10)


def largest_allocation(run) -> int:  # noqa: ANN001
    """Bytes of the largest net allocation of any op while ``run()`` executes (torch profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max(event.cpu_memory_usage for event in prof.events())


def test_fast_path_never_allocates_an_n_by_m_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    N = M = 2048
    q, k, v = (x.detach() for x in qkv(N, M, seed=2, heads=2, kv_heads=2, d=16, dv=16, dtype=torch.float32))
    q_bias, k_bias = alibi_bias_factors(2, N)
    dense_bytes = 2 * N * M * 4  # one float32 [B=1, H=2, N, M] tensor
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(kwargs)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(flashbias_module.F, "scaled_dot_product_attention", spy)
    for causal in (True, False):
        fast = largest_allocation(lambda c=causal: flashbias_attention(q[:1], k[:1], v[:1], q_bias=q_bias,
                                                                        k_bias=k_bias, causal=c))
        assert fast < dense_bytes // 8, fast
        assert calls[-1]["attn_mask"] is None and calls[-1]["is_causal"] is causal
    dense = largest_allocation(lambda: flashbias_attention(q[:1], k[:1], v[:1], q_bias=q_bias, k_bias=k_bias,
                                                           causal=True, impl="reference"))
    assert dense >= dense_bytes  # the probe does see an N x M tensor when one is built


@pytest.mark.parametrize("n,m", [(64, 64), (20, 50)])
def test_alibi_factors_reproduce_the_dense_bias_in_float32(n: int, m: int) -> None:
    q_bias, k_bias = alibi_bias_factors(8, n, m)
    assert q_bias.dtype == torch.float32 and q_bias.shape == (1, 8, n, 2) and k_bias.shape == (1, 1, m, 2)
    bias = torch.einsum("bhnr,bhmr->bhnm", q_bias.double(), k_bias.double())[0]
    expected = dense_alibi(8, n, m)
    assert (bias - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_alibi_bf16_factors_are_exact_at_long_n() -> None:
    n = 16384
    q_bias, k_bias = alibi_bias_factors(4, n, dtype=torch.bfloat16)
    assert q_bias.dtype == torch.bfloat16 and q_bias.shape == (1, 4, n, 8) and k_bias.shape == (1, 4, n, 8)
    rows = torch.arange(0, n, 997)
    bias = torch.einsum("hnr,hmr->hnm", q_bias[0, :, rows].double(), k_bias[0].double())  # exact in float64
    expected = alibi_rows(4, n, rows)
    assert (bias - expected).abs().max() <= 2.0**-15 * expected.abs().max()
    naive_q, naive_k = alibi_bias_factors(4, n)  # rank 2, rounded to bf16: large errors
    naive = torch.einsum("hnr,hmr->hnm", naive_q[0, :, rows].bfloat16().double(),
                         naive_k[0].expand(4, n, 2).bfloat16().double())
    assert (naive - expected).abs().max() > 100 * (bias - expected).abs().max()


def test_alibi_attention_in_bf16_at_long_n() -> None:
    """bf16 FlashBias with the exact factors stays at the bf16 floor; the naive rank-2 factors do not."""
    H, N, last = 2, 4096, 256
    q, k, v = (x.detach()[:1] for x in qkv(N, N, seed=3, heads=H, kv_heads=H, d=32, dv=32, dtype=torch.bfloat16))
    rows = torch.arange(N - last, N)  # the far positions, where rank-2 factors cancel worst
    mask = alibi_rows(H, N, rows).masked_fill(rows[:, None] < torch.arange(N)[None, :], float("-inf"))[None]
    expected = softmax_attention(q[:, :, rows].double(), k.double(), v.double(), attn_mask=mask)

    def error(q_bias: torch.Tensor, k_bias: torch.Tensor) -> float:
        out = flashbias_attention(q, k, v, q_bias=q_bias, k_bias=k_bias, causal=True)
        assert out.dtype == torch.bfloat16
        return float((out[:, :, rows].double() - expected).norm() / expected.norm())

    exact = error(*alibi_bias_factors(H, N, dtype=torch.bfloat16))
    naive = error(*(x.bfloat16() for x in alibi_bias_factors(H, N)))
    assert exact < 1e-2, exact
    assert naive > 0.1, naive


def test_spatial_distance_factors_reproduce_the_dense_bias() -> None:
    g = torch.Generator().manual_seed(4)
    xq = torch.rand(2, 3, 30, 3, generator=g) * 4
    xk = torch.rand(2, 3, 40, 3, generator=g) * 4
    weight = torch.rand(2, 3, 30, generator=g) + 0.5  # per token, per head
    q_bias, k_bias = spatial_distance_bias_factors(xq, xk, weight)
    assert q_bias.shape == (2, 3, 30, 5) and k_bias.shape == (2, 3, 40, 5)
    bias = q_bias @ k_bias.transpose(-1, -2)
    expected = -weight[..., None].double() * torch.cdist(xq.double(), xk.double()).square()
    assert (bias.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_svd_error_is_the_singular_value_tail() -> None:
    g = torch.Generator().manual_seed(5)
    i = torch.arange(24, dtype=torch.float64)
    bias = -0.3 * (i[:, None] - i[None, :]).abs() + 0.01 * torch.randn(2, 24, 24, generator=g, dtype=torch.float64)
    for rank in (1, 3, 8, 24):
        q_bias, k_bias, error = svd_bias_factors(bias, rank)
        assert q_bias.shape == (2, 24, rank) and k_bias.shape == (2, 24, rank) and error.shape == (2,)
        actual = (bias - q_bias @ k_bias.transpose(-1, -2)).norm(dim=(-2, -1)) / bias.norm(dim=(-2, -1))
        s = np.linalg.svd(bias.numpy(), compute_uv=False)
        tail = np.sqrt((s[:, rank:] ** 2).sum(-1) / (s**2).sum(-1))
        torch.testing.assert_close(error, actual, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(error.numpy(), tail, rtol=1e-8, atol=1e-12)
    assert float(svd_bias_factors(bias, 2)[2].max()) > 0.01  # the symmetric |i - j| bias is not low rank
    with pytest.raises(ValueError, match="rank"):
        svd_bias_factors(bias, 25)


def test_bad_factors_raise_naming_them() -> None:
    q, k, v = qkv(8, 8, seed=6)
    good_q, good_k = torch.randn(1, 1, 8, 2), torch.randn(1, 1, 8, 2)
    with pytest.raises(ValueError, match="q_bias"):
        flashbias_attention(q, k, v, q_bias=torch.randn(1, 1, 7, 2), k_bias=good_k)
    with pytest.raises(ValueError, match="k_bias"):
        flashbias_attention(q, k, v, q_bias=good_q, k_bias=torch.randn(1, 3, 8, 2))
    with pytest.raises(ValueError, match="rank"):
        flashbias_attention(q, k, v, q_bias=good_q, k_bias=torch.randn(1, 1, 8, 3))
    with pytest.raises(TypeError, match="q_bias"):
        flashbias_attention(q, k, v, q_bias=good_q.long(), k_bias=good_k)


def test_default_float32_alibi_factors_with_bf16_inputs_are_rebuilt_exactly() -> None:
    """The default call (float32 factors, bf16 q/k/v) at N=2048: <= 1e-2 against float64 (was 0.38)."""
    H, N = 4, 2048
    q, k, v = (x.detach()[:1] for x in qkv(N, N, seed=5, heads=H, kv_heads=H, d=64, dv=64, dtype=torch.bfloat16))
    q_bias, k_bias = alibi_bias_factors(H, N)  # float32
    out = flashbias_attention(q, k, v, q_bias=q_bias, k_bias=k_bias, causal=True)
    mask = dense_alibi(H, N, N).masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    expected = softmax_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    error = float((out.double() - expected).norm() / expected.norm())
    assert out.dtype == torch.bfloat16 and error <= 1e-2, error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wider_factors_that_would_round_are_refused(dtype: torch.dtype) -> None:
    q, k, v = (x.detach() for x in qkv(16, 16, seed=6, heads=2, kv_heads=2, d=8, dv=8, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    q_bias, k_bias = torch.randn(1, 2, 16, 3, generator=g), torch.randn(1, 1, 16, 3, generator=g)
    with pytest.raises(ValueError, match=r"alibi_bias_factors\(\.\.\., dtype="):
        flashbias_attention(q, k, v, q_bias=q_bias, k_bias=k_bias)
    # factors that the dtype holds exactly are cast, whatever their own dtype
    exact = flashbias_attention(q, k, v, q_bias=q_bias.to(dtype).float(), k_bias=k_bias.to(dtype).double())
    cast = flashbias_attention(q, k, v, q_bias=q_bias.to(dtype), k_bias=k_bias.to(dtype))
    assert torch.equal(exact, cast)
