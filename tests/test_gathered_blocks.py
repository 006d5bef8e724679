"""The chunked, checkpointed gathered block attention equals one call over every block, values and
gradients, for every op that uses it (several chunks forced by a tiny chunk budget)."""

from __future__ import annotations

import pytest
import torch

import attnlab.ops.sliding_window as sliding
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
    monkeypatch.setattr(sliding, "_GATHER_CHUNK_BYTES", 1)  # one query block per chunk
    chunked = CASES[name](q, k, v)
    chunked_grads = torch.autograd.grad(chunked.square().sum(), (q, k, v))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(chunked_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the no-grad path runs the chunks without checkpointing
        torch.testing.assert_close(CASES[name](q, k, v), whole, rtol=1e-12, atol=1e-12)
