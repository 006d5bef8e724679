"""Softmax attention: masks, alignment, grouped heads, empty rows, low precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.ops import softmax_attention
from attnlab.testing import relative_error


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def dense(q, k, v, allowed=None, additive=None, scale=None):
    """Independent oracle: explicit loops over heads with repeat_interleave for grouped heads."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if additive is not None:
        s = s + additive
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("N,M", [(7, 7), (3, 11), (1, 9)], ids=["square", "N<M", "decode"])
def test_causal_aligns_queries_to_the_end_of_the_keys(impl: str, N: int, M: int) -> None:
    q, k, v = rand(2, 4, N, 8, seed=1), rand(2, 4, M, 8, seed=2), rand(2, 4, M, 6, seed=3)
    allowed = torch.arange(M)[None, :] <= torch.arange(N)[:, None] + (M - N)
    torch.testing.assert_close(softmax_attention(q, k, v, causal=True, impl=impl), dense(q, k, v, allowed))
    if N < M:  # SDPA's own is_causal aligns to the start: a different answer
        start = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert not torch.allclose(start, softmax_attention(q, k, v, causal=True, impl=impl))


def test_causal_with_more_queries_than_keys_is_an_error() -> None:
    with pytest.raises(ValueError, match="N=5 queries and M=3 keys"):
        softmax_attention(rand(1, 1, 5, 4), rand(1, 1, 3, 4), rand(1, 1, 3, 4), causal=True)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6])
def test_grouped_heads_follow_repeat_interleave(impl: str, kv_heads: int) -> None:
    q, k, v = rand(2, 6, 9, 8, seed=4), rand(2, kv_heads, 9, 8, seed=5), rand(2, kv_heads, 9, 5, seed=6)
    torch.testing.assert_close(softmax_attention(q, k, v, impl=impl), dense(q, k, v))


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_boolean_additive_and_padding_masks_combine(impl: str) -> None:
    B, H, N, M = 2, 3, 6, 8
    q, k, v = rand(B, H, N, 4, seed=7), rand(B, H, M, 4, seed=8), rand(B, H, M, 4, seed=9)
    allowed = rand(1, H, N, M, seed=10) > -0.5
    additive = rand(B, 1, 1, M, seed=11)
    padding = torch.tensor([[True] * M, [True] * 5 + [False] * 3])
    out = softmax_attention(q, k, v, attn_mask=allowed, key_padding_mask=padding, impl=impl)
    both = allowed & padding[:, None, None, :]
    expected = dense(q, k, v, both).masked_fill(~both.any(-1, keepdim=True), 0.0)
    torch.testing.assert_close(out, expected)
    out = softmax_attention(q, k, v, attn_mask=additive, causal=True, scale=0.3, impl=impl)
    torch.testing.assert_close(out, dense(q, k, v, torch.ones(N, M).tril(M - N).bool(), additive, scale=0.3))


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_rows_with_no_allowed_key_are_zero_and_gradients_finite(impl: str) -> None:
    q, k, v = (rand(1, 2, 5, 4, seed=s).requires_grad_() for s in (12, 13, 14))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    out = softmax_attention(q, k, v, attn_mask=mask, impl=impl)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    float_mask = torch.zeros(5, 5).masked_fill(~mask, float("-inf")).double()
    out2 = softmax_attention(q, k, v, attn_mask=float_mask, impl=impl)
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_at_a_realistic_length(causal: bool) -> None:
    q, k, v = (rand(1, 4, 2048, 64, seed=s, dtype=torch.bfloat16) for s in (15, 16, 17))
    out = softmax_attention(q, k, v, causal=causal)
    assert out.dtype == torch.bfloat16
    expected = softmax_attention(q.double(), k.double(), v.double(), causal=causal, impl="reference")
    assert relative_error(out, expected) < 2e-2


def test_scale_default_and_explicit() -> None:
    q, k, v = rand(1, 2, 4, 16, seed=18), rand(1, 2, 4, 16, seed=19), rand(1, 2, 4, 16, seed=20)
    torch.testing.assert_close(softmax_attention(q, k, v), dense(q, k, v, scale=0.25))
    torch.testing.assert_close(softmax_attention(q, k, v, scale=2.0), dense(q, k, v, scale=2.0))


@pytest.mark.parametrize("kwargs,error,words", [
    ({"impl": "flash3"}, ValueError, "impl='flash3'"),
    ({"attn_mask": torch.ones(2, 3, 4, 5, 6, dtype=torch.bool)}, ValueError, "attn_mask of shape (2, 3, 4, 5, 6)"),
    ({"attn_mask": torch.ones(4, 4, dtype=torch.int64)}, TypeError, "attn_mask must be boolean"),
    ({"key_padding_mask": torch.ones(1, 4)}, TypeError, "key_padding_mask must be boolean"),
    ({"key_padding_mask": torch.ones(4, dtype=torch.bool)}, ValueError, "[B, M] = [1, 4]"),
    ({"scale": float("inf")}, ValueError, "scale=inf"),
    ({"scale": torch.tensor(1.0)}, TypeError, "scale must be a float"),
])
def test_option_errors_name_the_argument(kwargs: dict, error: type, words: str) -> None:
    q = rand(1, 2, 4, 8)
    with pytest.raises(error) as info:
        softmax_attention(q, q, q, **kwargs)
    assert words in str(info.value)


def test_mixed_dtypes_are_refused() -> None:
    q = rand(1, 2, 4, 8)
    with pytest.raises(TypeError, match="one dtype"):
        softmax_attention(q, q.float(), q)
