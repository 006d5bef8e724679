"""Agent attention: pooling, the two softmax steps, biases, grids, the layer with DWC, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.ops import adaptive_pool_matrix, agent_attention, agent_tokens
from attnlab.testing import relative_error


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def two_softmaxes(q, k, v, A, b1=0.0, b2=0.0):
    s = q.shape[-1] ** -0.5
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    agent_v = torch.softmax(A @ k.transpose(-1, -2) * s + b1, -1) @ v
    return torch.softmax(q @ A.transpose(-1, -2) * s + b2, -1) @ agent_v


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_agents_are_block_means_of_the_queries(impl: str) -> None:
    """N = 12, n = 4: agent a is the mean of queries 3a..3a+2 (computed here by slicing)."""
    q, k, v = rand(2, 4, 12, 8, seed=1), rand(2, 2, 12, 8, seed=2), rand(2, 2, 12, 5, seed=3)
    A = torch.stack([q[:, :, 3 * a: 3 * a + 3].mean(2) for a in range(4)], dim=2)
    torch.testing.assert_close(agent_attention(q, k, v, num_agents=4, impl=impl), two_softmaxes(q, k, v, A))


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_grid_pooling_skips_the_cls_token(impl: str) -> None:
    """grid (4, 6) + CLS, 4 agents = 2 x 2 pooling: agent (r, c) averages a 2 x 3 patch block."""
    q, k, v = rand(1, 2, 25, 4, seed=4), rand(1, 2, 25, 4, seed=5), rand(1, 2, 25, 3, seed=6)
    patches = q[:, :, 1:].reshape(1, 2, 4, 6, 4)
    blocks = [patches[:, :, 2 * r: 2 * r + 2, 3 * c: 3 * c + 3] for r in range(2) for c in range(2)]
    A = torch.stack([block.mean((2, 3)) for block in blocks], dim=2)
    torch.testing.assert_close(agent_tokens(q, 4, grid=(4, 6)), A)
    torch.testing.assert_close(agent_attention(q, k, v, num_agents=4, grid=(4, 6), impl=impl),
                               two_softmaxes(q, k, v, A))


@pytest.mark.parametrize("L,n", [(13, 4), (7, 7), (50, 9), (9, 1)])
def test_pool_matrix_is_torch_adaptive_average_pooling(L: int, n: int) -> None:
    x = rand(3, L, seed=7)
    torch.testing.assert_close(x @ adaptive_pool_matrix(L, n).T, F.adaptive_avg_pool1d(x[:, None], n)[:, 0])


@pytest.mark.parametrize("grid,N", [(None, 37), ((5, 6), 30), ((5, 6), 31)], ids=["seq", "grid", "grid+cls"])
@pytest.mark.parametrize("M", [None, 20], ids=["self", "cross"])
def test_sdpa_path_equals_the_reference_with_biases(grid, N: int, M) -> None:
    M = M or N
    q, k, v = rand(2, 4, N, 8, seed=8), rand(2, 2, M, 8, seed=9), rand(2, 2, M, 6, seed=10)
    b1, b2 = rand(4, 9, M, seed=11), rand(1, 4, N, 9, seed=12)
    ref = agent_attention(q, k, v, num_agents=9, grid=grid, agent_bias=b1, query_bias=b2, impl="reference")
    assert relative_error(agent_attention(q, k, v, num_agents=9, grid=grid, agent_bias=b1, query_bias=b2), ref) < 1e-10
    out32 = agent_attention(q.float(), k.float(), v.float(), num_agents=9, grid=grid, agent_bias=b1.float(),
                            query_bias=b2.float())
    assert out32.dtype == torch.float32 and relative_error(out32, ref) < 1e-5


def test_given_agents_and_their_permutation_with_the_biases() -> None:
    q, k, v = rand(1, 2, 15, 4, seed=13), rand(1, 2, 15, 4, seed=14), rand(1, 2, 15, 4, seed=15)
    A, b1, b2 = rand(1, 2, 5, 4, seed=16), rand(2, 5, 15, seed=17), rand(2, 15, 5, seed=18)
    out = agent_attention(q, k, v, agents=A, agent_bias=b1, query_bias=b2)
    torch.testing.assert_close(out, two_softmaxes(q, k, v, A, b1, b2))
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = agent_attention(q, k, v, agents=A[:, :, perm], agent_bias=b1[:, perm], query_bias=b2[..., perm])
    torch.testing.assert_close(permuted, out)
    assert not torch.allclose(agent_attention(q, k, v, agents=A[:, :, perm], agent_bias=b1, query_bias=b2), out)


def test_cost_grows_linearly_the_scores_are_n_by_N() -> None:
    """With n = N agents equal to the keys, step 1 is softmax(K K^T / sqrt(D)) V (a shape check of the form)."""
    q, k, v = rand(1, 1, 6, 4, seed=19), rand(1, 1, 6, 4, seed=20), rand(1, 1, 6, 4, seed=21)
    out = agent_attention(q, k, v, agents=k)
    agent_v = torch.softmax(k @ k.transpose(-1, -2) / 2, -1) @ v
    torch.testing.assert_close(out, torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ agent_v)


@pytest.mark.parametrize("kwargs,error,words", [
    ({"causal": True}, NotImplementedError, "no causal form"),
    ({"num_agents": 11}, ValueError, "num_agents=11 is larger than the sequence length N=10"),
    ({"num_agents": 0}, ValueError, "num_agents must be >= 1"),
    ({"num_agents": 3, "grid": (2, 5)}, ValueError, "perfect square"),
    ({"num_agents": 9, "grid": (2, 5)}, ValueError, "larger than the grid"),
    ({"num_agents": 4, "grid": (2, 3)}, ValueError, "grid=(2, 3) needs N = h*w = 6"),
    ({"grid": "square"}, ValueError, "grid must be a pair"),
    ({"agents": torch.zeros(1, 2, 3, 5)}, ValueError, "agents must have shape [B, H, n, D] = [1, 2, n, 4]"),
    ({"num_agents": 2, "agent_bias": torch.zeros(2, 3, 10)}, ValueError, "agent_bias of shape (2, 3, 10)"),
    ({"num_agents": 2, "query_bias": torch.zeros(11, 2)}, ValueError, "query_bias of shape (11, 2)"),
    ({"impl": "flash"}, ValueError, "impl='flash'"),
])
def test_bad_options_raise_naming_the_argument(kwargs: dict, error: type, words: str) -> None:
    q = rand(1, 2, 10, 4)
    with pytest.raises(error) as info:
        agent_attention(q, q, q, **kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("grid,N", [(None, 11), ((3, 4), 12), ((3, 4), 13)], ids=["seq", "grid", "grid+cls"])
def test_agent_layer_is_the_documented_composition(grid, N: int) -> None:
    """AgentAttention == agent_attention with the interpolated biases, + depthwise conv of V, then proj."""
    from attnlab.nn import AgentAttention

    torch.manual_seed(3)
    layer = AgentAttention(16, 2, num_agents=4, grid=grid).double()
    B = 2
    x = rand(B, N, 16, seed=22)
    q, k, v = (t.reshape(B, N, 2, 8).transpose(1, 2) for t in (x @ layer.qkv.weight.T).chunk(3, dim=-1))
    if grid is None:
        A = torch.stack([q[:, :, 0:3].mean(2), q[:, :, 2:6].mean(2), q[:, :, 5:9].mean(2), q[:, :, 8:11].mean(2)], 2)
        b1 = F.interpolate(layer.an_bias, size=N, mode="linear")
        b2 = F.interpolate(layer.na_bias, size=N, mode="linear").transpose(1, 2)
        conv = F.conv1d(v.transpose(1, 2).reshape(B, N, 16).transpose(1, 2), layer.dwc.weight, layer.dwc.bias,
                        padding=1, groups=16).transpose(1, 2)
        prefix = 0
    else:
        prefix = N - 12
        patches = q[:, :, prefix:].reshape(B, 2, 3, 4, 8)
        blocks = [patches[:, :, r0:r1, c0:c1] for r0, r1 in ((0, 2), (1, 3)) for c0, c1 in ((0, 2), (2, 4))]
        A = torch.stack([b.mean((2, 3)) for b in blocks], 2)
        b1 = F.interpolate(layer.an_bias, size=(3, 4), mode="bilinear").reshape(2, 4, 12)
        b1 = b1 + (layer.ah_bias + layer.aw_bias).reshape(2, 4, 12)
        b2 = F.interpolate(layer.na_bias, size=(3, 4), mode="bilinear").reshape(2, 4, 12).transpose(1, 2)
        b2 = b2 + (layer.ha_bias + layer.wa_bias).reshape(2, 12, 4)
        if prefix:
            b1, b2 = torch.cat([layer.ac_bias, b1], -1), torch.cat([layer.ca_bias, b2], -2)
        image = v[:, :, prefix:].transpose(1, 2).reshape(B, 12, 16).transpose(1, 2).reshape(B, 16, 3, 4)
        conv = F.conv2d(image, layer.dwc.weight, layer.dwc.bias, padding=1, groups=16).flatten(2).transpose(1, 2)
    o = two_softmaxes(q, k, v, A, b1, b2).transpose(1, 2).reshape(B, N, 16)
    o = torch.cat([o[:, :prefix], o[:, prefix:] + conv], 1)
    torch.testing.assert_close(layer(x), layer.proj(o))


def test_agent_layer_refuses_causal_and_too_many_agents() -> None:
    from attnlab.nn import AgentAttention

    with pytest.raises(NotImplementedError, match="no causal form"):
        AgentAttention(16, 2, causal=True)
    with pytest.raises(ValueError, match="num_agents=9 is larger than the sequence length N=5"):
        AgentAttention(16, 2, num_agents=9)(rand(1, 5, 16, seed=23, dtype=torch.float32))
    with pytest.raises(ValueError, match="perfect square"):
        AgentAttention(16, 2, num_agents=5, grid=(4, 4))
