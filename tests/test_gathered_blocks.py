"""The chunked, checkpointed gathered block attention equals one call over every block, values and
gradients, for every op that uses it (several chunks forced by a tiny chunk budget)."""

from __future__ import annotations

import pytest
import torch

import attnlab.ops.gathered_blocks as gathered
from attnlab.ops.dynamic_mask import dynamic_mask_attention
from attnlab.ops.hip import hip_attention
from attnlab.ops.neighborhood import neighborhood_attention
from attnlab.ops.sliding_window import sliding_window_attention

CASES = {
    "sliding_window": lambda q, k, v: sliding_window_attention(q, k, v, window=7, causal=True, sink_tokens=2),
    "neighborhood": lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=5),
    "hip": lambda q, k, v: hip_attention(q, k, v, k_budget=8, block_size_q=4, block_size_k=2, window=4,
                                         sink_tokens=1),
    "dynamic_mask": lambda q, k, v: dynamic_mask_attention(q, k, v, key_bias=torch.linspace(-1, 1, q.shape[2]).
                                                           expand(q.shape[0], q.shape[1], -1).contiguous(),
                                                           k_budget=6, causal=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunks_equal_one_call(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 61, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    whole = CASES[name](q, k, v)
    grads = torch.autograd.grad(whole.square().sum(), (q, k, v))
    monkeypatch.setattr(gathered, "_GATHER_CHUNK_BYTES", 1)  # one query block per chunk
    chunked = CASES[name](q, k, v)
    chunked_grads = torch.autograd.grad(chunked.square().sum(), (q, k, v))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(chunked_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the no-grad path runs the chunks without checkpointing
        torch.testing.assert_close(CASES[name](q, k, v), whole, rtol=1e-12, atol=1e-12)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_index: torch.Tensor, allowed: torch.Tensor,
           scale: float, key_bias: torch.Tensor | None) -> torch.Tensor:
    """The definition: query n of block g sees the keys key_index[.., g, s] with allowed[.., g, n % Bq, s];
    softmax over them of scale q.k + bias; a row that sees no key is zero."""
    B, H, N, _ = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G, Bq, S = allowed.shape[-3:]
    index = key_index.expand(B, Hkv, G, S)
    seen = torch.zeros(B, Hkv, G, Bq, M, dtype=torch.bool)
    seen.scatter_(-1, index[:, :, :, None, :].expand(B, Hkv, G, Bq, S), allowed.expand(B, Hkv, G, Bq, S))
    seen = seen.reshape(B, Hkv, G * Bq, M)[:, :, :N].repeat_interleave(H // Hkv, dim=1)  # (B, H, N, M)
    kk, vv = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = scale * q @ kk.transpose(-1, -2)
    if key_bias is not None:
        scores = scores + key_bias.repeat_interleave(H // Hkv, dim=1)[:, :, None, :]
    weights = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights @ vv


@pytest.mark.parametrize("shared_lists", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_backward_matches_the_definition(shared_lists: bool, with_bias: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU autograd function (kept log-sum-exps, fused backward kernel, gradients added into one buffer)
    against autograd through the dense definition: GQA, Dv != D, rows without keys, several chunks."""
    torch.manual_seed(1)
    B, H, Hkv, N, M, D, Dv, Bq, S = 2, 4, 2, 45, 50, 12, 20, 8, 9
    G = -(-N // Bq)
    q = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, M, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, M, Dv, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(B, Hkv, M, dtype=torch.float64, requires_grad=True) if with_bias else None
    lists = (G, S) if shared_lists else (B, Hkv, G, S)
    index = torch.rand(*lists[:-1], M).argsort(dim=-1)[..., :S]  # distinct keys per block
    allowed = torch.rand(*lists[:-1], Bq, S) < 0.6
    allowed[..., 3, :] = False  # a row of every block sees nothing
    monkeypatch.setattr(gathered, "_GATHER_CHUNK_BYTES", 1)
    monkeypatch.setattr(gathered, "_GATHER_CHUNK_MIN_ROWS", 2 * Bq)  # chunks of two blocks
    inputs = [t for t in (q, k, v, bias) if t is not None]
    out = gathered.gathered_block_attention(q, k, v, key_index=index, allowed=allowed, scale=0.3, key_bias=bias)
    want = _dense(q, k, v, index, allowed, 0.3, bias)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    assert out[:, :, 3::Bq].abs().max() == 0
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    expected = torch.autograd.grad(want, inputs, grad)
    for name, a, b in zip("qkvb", got, expected, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"grad {name}: {m}")
