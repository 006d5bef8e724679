"""Compiled FlexAttention path of the local ops (attnlab.ops.flex): == reference, cache, dispatch.

Every test id names "neighborhood" or "sliding" (``-k "neighborhood or sliding"`` selects them all).

On CPU, torch 2.13's compiled FlexAttention is forward-only (see the module docstring of
attnlab.ops.flex), so gradients are checked only as a clear NotImplementedError here; the CUDA
backward is exercised by scripts/gpu_check.py. Shapes are reused across tests: each new
(mask function, dtype, head dim, GQA) combination costs one compilation (seconds on CPU).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import attnlab.ops.flex as flex
import attnlab.ops.neighborhood as neighborhood_module
import attnlab.ops.sliding_window as sliding_window_module
from attnlab.ops import neighborhood_attention, sliding_window_attention
from attnlab.ops.flex import auto_uses_flex, clear_flex_cache, flex_block_mask, flex_cache_info
from attnlab.testing import relative_error

# (op, options, H_kv of 4 query heads): causal and non-causal, GQA and not, 1-D / 2-D / 3-D grids
FLOAT32_CASES = [
    pytest.param(sliding_window_attention, dict(window=37, causal=True), 2, 200, id="sliding_window-causal-gqa"),
    pytest.param(sliding_window_attention, dict(window=37, causal=False), 4, 200, id="sliding_window-bidir"),
    pytest.param(neighborhood_attention, dict(kernel_size=6, stride=3, dilation=2, causal=True), 2, 200,
                 id="neighborhood-1d-K6-s3-d2-causal-gqa"),
    pytest.param(neighborhood_attention, dict(shape=(12, 20), kernel_size=(5, 7), stride=(1, 2), dilation=(2, 1)),
                 4, 240, id="neighborhood-2d-strided-dilated"),
    pytest.param(neighborhood_attention, dict(shape=(3, 4, 5), kernel_size=(2, 3, 3), causal=(True, False, False)),
                 2, 60, id="neighborhood-3d-causal-frames-gqa"),
]


def reference(op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options) -> torch.Tensor:  # noqa: ANN001
    return op(q.double(), k.double(), v.double(), impl="reference", **options)


def random_qkv(N: int, *, kv_heads: int, seed: int, dtype: torch.dtype = torch.float32, head_dim: int = 16,
               batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, N, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, N, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, N, head_dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("op,options,kv_heads,N", FLOAT32_CASES)
def test_flex_float32_equals_float64_reference(op, options: dict, kv_heads: int, N: int) -> None:  # noqa: ANN001
    q, k, v = random_qkv(N, kv_heads=kv_heads, seed=N + kv_heads)
    out = op(q, k, v, impl="flex", **options)
    expected = reference(op, q, k, v, **options)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    error = relative_error(out, expected)
    assert error < 2e-6, f"rel. error {error:.2e}"
    gather = op(q, k, v, impl="gather", **options)  # the two fast paths agree too
    assert relative_error(out, gather) < 2e-6


@pytest.mark.parametrize("op,options", [
    pytest.param(sliding_window_attention, dict(window=128, causal=True), id="sliding_window-128-causal"),
    pytest.param(neighborhood_attention, dict(shape=(32, 32), kernel_size=(7, 9)), id="neighborhood-2d-32x32-K7x9"),
])
def test_flex_bfloat16_at_1024_tokens(op, options: dict) -> None:  # noqa: ANN001
    """bf16 in, bf16 out, N=1024, D=64, against the float64 reference on the same (bf16-rounded) inputs.

    Tolerance 5e-3: rounding the output to bf16 (8 significant bits) alone costs a relative error of
    about 1.6e-3 (at most 2^-8 per entry; the gather path, float32 inside, measured 1.6e-3 here); the
    flex kernel measured 2.1e-3 (it also rounds the probabilities to bf16 for ``P V``). 5e-3 leaves
    2.5x that, while a lost or shifted mask gives errors of order 1e-1. flex may be worse than gather
    by at most 2.5e-3.
    """
    q, k, v = random_qkv(1024, kv_heads=2, seed=3, dtype=torch.bfloat16, head_dim=64, batch=1)
    out = op(q, k, v, impl="flex", **options)
    assert out.dtype == torch.bfloat16
    expected = reference(op, q, k, v, **options)
    error = relative_error(out, expected)
    assert error < 5e-3, f"bf16 rel. error {error:.2e}"
    gather_error = relative_error(op(q, k, v, impl="gather", **options), expected)
    assert error < gather_error + 2.5e-3, (error, gather_error)


def test_flex_neighborhood_sliding_have_no_cpu_backward_and_say_so() -> None:
    q, k, v = (x.requires_grad_(True) for x in random_qkv(200, kv_heads=4, seed=4))
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        sliding_window_attention(q, k, v, window=8, impl="flex", causal=True)
    with pytest.raises(NotImplementedError, match="impl='gather'"):
        neighborhood_attention(q, k, v, kernel_size=5, impl="flex")
    with torch.no_grad():  # no gradient needed: fine
        sliding_window_attention(q, k, v, window=37, causal=False, impl="flex")


def test_sliding_window_block_mask_is_cached_and_reused() -> None:
    clear_flex_cache()
    q, k, v = random_qkv(200, kv_heads=4, seed=5)
    first = sliding_window_attention(q, k, v, window=37, causal=False, impl="flex")
    assert flex_cache_info().builds == 1 and flex_cache_info().hits == 0
    q2, k2, v2 = random_qkv(200, kv_heads=4, seed=6)
    second = sliding_window_attention(q2, k2, v2, window=37, causal=False, impl="flex")
    info = flex_cache_info()
    assert (info.builds, info.hits, info.size) == (1, 1, 1), info
    assert not torch.allclose(first, second)
    sliding_window_attention(q, k, v, window=36, causal=False, impl="flex")  # other parameters: a new mask
    assert flex_cache_info().builds == 2
    # the cache returns the very same BlockMask object for equal keys
    mask = flex_block_mask(lambda b, h, i, j: i >= j, mask_key=("test", 1), length=50, key_length=50,
                           device=torch.device("cpu"))
    again = flex_block_mask(lambda b, h, i, j: i < j, mask_key=("test", 1), length=50, key_length=50,
                            device=torch.device("cpu"))
    assert again is mask


def test_neighborhood_chunked_block_mask_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long masks are built in chunks of query rows; the result is the mask built in one call."""
    grid = neighborhood_module._Grid((1000,), 45, 2, 3, False)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return grid.allowed(i, j)

    whole = flex._build_block_mask(mask_mod, 1000, 1000, torch.device("cpu"), 128)
    monkeypatch.setattr(flex, "MASK_CHUNK_ELEMENTS", 256 * 1000)  # 256 rows per chunk: 4 chunks
    chunked = flex._build_block_mask(mask_mod, 1000, 1000, torch.device("cpu"), 128)
    assert torch.equal(chunked.to_dense(), whole.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert chunked.seq_lengths == (1000, 1000) and chunked.mask_mod is mask_mod
    # the listed blocks are exactly those holding an allowed (query, key) pair of the NATTEN mask
    padded = torch.zeros(1024, 1024, dtype=torch.bool)
    padded[:1000, :1000] = neighborhood_module.neighborhood_mask(1000, 45, stride=2, dilation=3)
    assert torch.equal(chunked.to_dense()[0, 0].bool(), padded.reshape(8, 128, 8, 128).any(dim=(1, 3)))
    # and attention through a chunk-built mask (128-row chunks at N=200: two) still equals the reference
    clear_flex_cache()
    monkeypatch.setattr(flex, "MASK_CHUNK_ELEMENTS", 1)
    q, k, v = random_qkv(200, kv_heads=4, seed=9)
    out = sliding_window_attention(q, k, v, window=37, causal=False, impl="flex")
    assert flex_cache_info().builds == 1
    expected = reference(sliding_window_attention, q, k, v, window=37, causal=False)
    assert relative_error(out, expected) < 2e-6
    clear_flex_cache()  # later tests must not reuse a mask built under the patched chunk size


def test_neighborhood_and_sliding_auto_picks_gather_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    for module in (neighborhood_module, sliding_window_module):
        real = module.gathered_block_attention
        monkeypatch.setattr(module, "gathered_block_attention",
                            lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))

        def no_flex(*args: object, **kwargs: object) -> None:
            raise AssertionError("impl='auto' took the flex path on CPU")

        monkeypatch.setattr(module, "flex_masked_attention", no_flex)
    q, k, v = (x.requires_grad_(True) for x in random_qkv(40, kv_heads=2, seed=7))
    neighborhood_attention(q, k, v, kernel_size=5).sum().backward()
    sliding_window_attention(q, k, v, window=5, causal=True).sum().backward()
    assert len(calls) == 2 and q.grad is not None


def test_neighborhood_and_sliding_auto_rule_flex_only_on_cuda() -> None:
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert auto_uses_flex(SimpleNamespace(device=cuda, dtype=torch.bfloat16))
    assert auto_uses_flex(SimpleNamespace(device=cuda, dtype=torch.float32))
    assert not auto_uses_flex(SimpleNamespace(device=cuda, dtype=torch.float64))
    assert not auto_uses_flex(torch.zeros(1))


def test_sliding_window_flex_inside_a_users_torch_compile() -> None:
    """The op traces into a user's compiled function (one graph break at the block-mask lookup)."""
    q, k, v = random_qkv(200, kv_heads=2, seed=8)

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sliding_window_attention(q * 0.5, k, v, window=37, causal=True, impl="flex") + 1

    explained = torch._dynamo.explain(block)(q, k, v)  # dynamo only: what lands in the user's graphs
    targets = [type(n.target).__name__ for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "FlexAttentionHOP" in targets, targets  # traced in, not a nested compiled call or eager fallback
    out = torch.compile(block)(q, k, v)
    expected = reference(sliding_window_attention, q * 0.5, k, v, window=37, causal=True) + 1
    assert relative_error(out, expected) < 2e-6
