"""RCMHA (arXiv 2308.03429): relative shift == explicit index, causal conv, identities (spec section 12)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.nn import RCMHA, DepthwiseCausalConv
from attnlab.ops.rcmha import (
    relative_attention,
    relative_attention_chunked,
    relative_scores,
    relative_scores_reference,
)


def tables(P: int, H: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pos_embeddings": torch.randn(2 * P, H, d, generator=g, dtype=torch.float64),
            "pos_bias": torch.randn(2 * P, H, generator=g, dtype=torch.float64),
            "query_bias": torch.randn(H, d, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("N,M", [(7, 7), (5, 12), (1, 4)], ids=["self", "memory", "one-query"])
def test_relative_shift_equals_the_explicit_index_formula(N: int, M: int) -> None:
    B, H, d, P = 2, 3, 4, 16
    g = torch.Generator().manual_seed(N * 100 + M)
    q = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, M, d, generator=g, dtype=torch.float64)
    t = tables(P, H, d, seed=M)
    fast = relative_scores(q, k, **t, impl="shift")
    reference = relative_scores_reference(q, k, **t)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    # a few entries by hand: query i sits at t_i = i + M - N
    R, b, u = t["pos_embeddings"], t["pos_bias"], t["query_bias"]
    for i, j in ((0, 0), (N - 1, M - 1), (N // 2, 1)):
        ti = i + M - N
        for h in range(H):
            expected = (q[1, h, i] + u[h]) @ k[1, h, j] + q[1, h, i] @ R[P + j - ti, h] + b[P + j - ti, h]
            torch.testing.assert_close(fast[1, h, i, j], expected)


def test_relative_scores_gradients_agree() -> None:
    B, H, N, d, P = 1, 2, 5, 3, 8
    q = torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, N + 2, d, dtype=torch.float64, requires_grad=True)
    t = {name: x.requires_grad_() for name, x in tables(P, H, d, seed=1).items()}
    w = torch.randn(B, H, N, N + 2, dtype=torch.float64)
    grads = []
    for impl in ("shift", "reference"):
        out = relative_scores(q, k, **t, impl=impl)
        grads.append(torch.autograd.grad((out * w).sum(), [q, k, *t.values()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_depthwise_conv_is_conv1d_on_the_left_padded_sequence() -> None:
    torch.manual_seed(0)
    conv = DepthwiseCausalConv(4, kernel_size=3).double()
    x = torch.randn(2, 3, 9, 4, dtype=torch.float64)  # (B, H, N, d)
    y = conv(x)
    for h in range(3):  # one set of weights for every head
        seq = x[:, h].transpose(1, 2)  # (B, d, N)
        expected = F.conv1d(F.pad(seq, (2, 0)), conv.conv.weight, conv.conv.bias, groups=4)
        torch.testing.assert_close(y[:, h], expected.transpose(1, 2))
        # the code's form: Conv1d with padding kernel_size - 1, the last kernel_size - 1 outputs cropped
        torch.testing.assert_close(y[:, h], conv.conv(seq)[..., :-2].transpose(1, 2))
    x2 = x.clone()
    x2[:, :, 5:] += 1.0
    torch.testing.assert_close(conv(x2)[:, :, :5], y[:, :, :5])


def test_identity_convs_and_zero_tables_give_causal_multi_head_attention() -> None:
    torch.manual_seed(1)
    dim, heads, N = 12, 3, 8
    layer = RCMHA(dim, heads, causal=True, kernel_size=1, max_distance=16).double()
    with torch.no_grad():
        for conv in (layer.query_conv, layer.key_conv, layer.value_conv):
            conv.conv.weight.fill_(1.0)
            conv.conv.bias.zero_()
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.query.weight, layer.key.weight, layer.value.weight]))
        mha.in_proj_bias.copy_(torch.cat([torch.zeros(2 * dim, dtype=torch.float64), layer.value.bias]))
        mha.out_proj.weight.copy_(layer.output.weight)
        mha.out_proj.bias.copy_(layer.output.bias)
    x = torch.randn(2, N, dim, dtype=torch.float64)
    mask = torch.ones(N, N, dtype=torch.bool).triu(1)
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(layer(x), expected)


def test_memory_with_pointwise_convs_equals_the_tail_of_the_whole_sequence() -> None:
    torch.manual_seed(2)
    layer = RCMHA(16, 4, causal=True, kernel_size=1, max_distance=32).double()
    with torch.no_grad():
        for p in (layer.key_pos_embeddings, layer.key_pos_bias, layer.query_pos_bias):
            p.normal_()
    whole = torch.randn(2, 11, 16, dtype=torch.float64)
    memory, x = whole[:, :4], whole[:, 4:]
    torch.testing.assert_close(layer(x, memory=memory), layer(whole)[:, 4:])


def test_relative_positions_change_the_output_and_bad_inputs_raise() -> None:
    torch.manual_seed(3)
    layer = RCMHA(16, 4, causal=True, max_distance=8).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    before = layer(x)
    with torch.no_grad():
        layer.key_pos_bias.normal_()
    assert not torch.allclose(layer(x), before)
    with pytest.raises(ValueError, match="max_distance=8"):
        layer(torch.randn(1, 9, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="memory"):
        layer(x, memory=torch.randn(1, 3, 15, dtype=torch.float64))
    q = torch.randn(1, 2, 4, 3)
    t = {name: value.float() for name, value in tables(8, 2, 3, seed=0).items()}
    with pytest.raises(ValueError, match="pos_bias"):
        relative_attention(q, q, q, **{**t, "pos_bias": t["pos_bias"][:, :1]}, causal=True)
    with pytest.raises(ValueError, match="query_bias"):
        relative_attention(q, q, q, **{**t, "query_bias": t["query_bias"][:1]}, causal=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("N,M,chunk", [(37, 37, 8), (20, 45, 6), (9, 9, 32)], ids=["self", "memory", "one-block"])
def test_chunked_attention_equals_the_explicit_scores_forward_and_backward(causal: bool, N: int, M: int,
                                                                            chunk: int) -> None:
    """Blocks of queries (checkpointed) == softmax of the explicitly indexed scores, values and gradients."""
    B, H, d, P = 2, 3, 4, 64
    g = torch.Generator().manual_seed(N + M + chunk)
    q = torch.randn(B, H, N, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, M, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, M, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = {name: x.requires_grad_() for name, x in tables(P, H, d, seed=chunk).items()}
    w = torch.randn(B, H, N, 5, generator=g, dtype=torch.float64)
    results = []
    for run in (lambda: relative_attention(q, k, v, **t, causal=causal, impl="reference"),
                lambda: relative_attention_chunked(q, k, v, **t, causal=causal, chunk_size=chunk)):
        out = run()
        results.append((out, *torch.autograd.grad((out * w).sum(), [q, k, v, *t.values()])))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bf16"])
def test_chunked_attention_at_length_2048(dtype: torch.dtype, tolerance: float) -> None:
    g = torch.Generator().manual_seed(77)
    q, k, v = (torch.randn(1, 2, 2048, 32, generator=g) for _ in range(3))
    t = {name: x * 0.3 for name, x in tables(2048, 2, 32, seed=78).items()}
    expected = relative_attention(q.double(), k.double(), v.double(), **t, causal=True, impl="shift")
    out = relative_attention(q.to(dtype), k.to(dtype), v.to(dtype), **{n: x.to(dtype) for n, x in t.items()},
                             causal=True)  # auto = chunked
    assert out.dtype == dtype
    assert float((out.double() - expected).norm() / expected.norm()) < tolerance
