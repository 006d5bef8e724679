"""Feature maps of linear attention: Based's Taylor map equals its explicit expansion; every map in every impl
equals the reference (float64, float32, bf16 at N=512), does not look ahead, passes gradients; the layer's
``feature_dim`` projection; feature counts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnlab.nn.attention import Attention
from attnlab.ops.linear import (
    FEATURE_MAPS,
    feature_count,
    feature_similarity,
    linear_attention,
    linear_attention_step,
    taylor_feature_map,
)
from attnlab.testing import relative_error

MAP_NAMES = ["elu+1", "relu", "identity", "taylor"]


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def test_taylor_features_are_the_explicit_expansion() -> None:
    d = 5
    x = rand(3, 7, d, seed=1)
    phi = taylor_feature_map(x)
    assert phi.shape == (3, 7, 1 + d + d * d)
    # entry by entry: [1, x_i / d^(1/4), x_i x_j / (sqrt(2) sqrt(d)) for i, j in row-major order]
    expected = torch.empty_like(phi)
    expected[..., 0] = 1.0
    for i in range(d):
        expected[..., 1 + i] = x[..., i] / d ** 0.25
        for j in range(d):
            expected[..., 1 + d + i * d + j] = x[..., i] * x[..., j] / (math.sqrt(2) * math.sqrt(d))
    assert (phi - expected).abs().max() < 1e-14
    # and the kernel it is built for: phi(x) . phi(y) = 1 + s + s^2 / 2, s = x . y / sqrt(d), the order-2
    # Taylor polynomial of exp(s)
    y = rand(3, 7, d, seed=2)
    s = (x * y).sum(-1) / math.sqrt(d)
    assert ((phi * taylor_feature_map(y)).sum(-1) - (1 + s + s * s / 2)).abs().max() < 1e-12
    small = 1e-3 * x  # close to zero the polynomial agrees with exp to third order
    s_small = (small * small).sum(-1) / math.sqrt(d)
    prod = (taylor_feature_map(small) * taylor_feature_map(small)).sum(-1)
    assert (prod - torch.exp(s_small)).abs().max() < 1e-15 + s_small.abs().max() ** 3


@pytest.mark.parametrize("name", MAP_NAMES)
def test_similarity_oracle_equals_the_feature_inner_product(name: str) -> None:
    q, k = rand(2, 3, 6, 4, seed=3), rand(2, 3, 9, 4, seed=4)
    written_out = {"elu+1": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x,
                   "taylor": taylor_feature_map}[name]
    expected = torch.einsum("bhnf,bhmf->bhnm", written_out(q), written_out(k))
    assert relative_error(feature_similarity(name, q, k), expected) < 1e-14
    assert relative_error(torch.einsum("bhnf,bhmf->bhnm", FEATURE_MAPS[name](q), FEATURE_MAPS[name](k)),
                          expected) < 1e-14


def test_feature_counts() -> None:
    assert [feature_count(name, 16) for name in MAP_NAMES] == [16, 16, 16, 1 + 16 + 256]
    assert feature_count(lambda x: torch.cat([x, x * x], -1), 5) == 10
    with pytest.raises(ValueError, match="feature_map='softmax' is not one of"):
        feature_count("softmax", 4)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        feature_count("taylor", 0)


CASES = [pytest.param(name, impl, causal, id=f"{name}-{impl}-{'causal' if causal else 'bidir'}")
         for name in MAP_NAMES for impl in ("chunked", "recurrent", "auto") for causal in (False, True)]


def inputs(N: int, M: int, D: int, *, seed: int, dtype: torch.dtype = torch.float64):
    """q [2, 4, N, D], k [2, 2, M, D], v [2, 2, M, 5]: grouped keys and values (H_kv = 2 of H = 4)."""
    return (rand(2, 4, N, D, seed=seed, dtype=dtype), rand(2, 2, M, D, seed=seed + 1, dtype=dtype),
            rand(2, 2, M, 5, seed=seed + 2, dtype=dtype))


@pytest.mark.parametrize("name,impl,causal", CASES)
def test_every_impl_equals_the_reference(name: str, impl: str, causal: bool) -> None:
    D = 4
    Fd = feature_count(name, D)
    q, k, v = inputs(13, 17 if not causal else 13, D, seed=5)
    # non-negative initial state so the normalized denominators stay away from zero
    s0 = (rand(2, 4, Fd, 5, seed=9).abs(), rand(2, 4, Fd, seed=10).abs() + 1)
    normalize = name != "identity"  # identity features make signed denominators; the plain sum is its use
    ref, (S_ref, z_ref) = linear_attention(q, k, v, causal=causal, feature_map=name, normalize=normalize,
                                           initial_state=s0, return_state=True, impl="reference")
    out, (S, z) = linear_attention(q, k, v, causal=causal, feature_map=name, normalize=normalize, chunk_size=4,
                                   initial_state=s0, return_state=True, impl=impl)
    assert out.dtype == torch.float64
    assert relative_error(out, ref) < 1e-10
    assert relative_error(S, S_ref) < 1e-10 and relative_error(z, z_ref) < 1e-10


@pytest.mark.parametrize("name,impl,causal", CASES)
def test_float32_equals_the_float64_reference(name: str, impl: str, causal: bool) -> None:
    q, k, v = inputs(29, 29, 8, seed=11)
    normalize = name != "identity"
    ref = linear_attention(q, k, v, causal=causal, feature_map=name, normalize=normalize, impl="reference")
    out = linear_attention(q.float(), k.float(), v.float(), causal=causal, feature_map=name, normalize=normalize,
                           chunk_size=8, impl=impl)
    assert out.dtype == torch.float32
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", MAP_NAMES)
def test_bfloat16_at_a_realistic_length(name: str, causal: bool) -> None:
    # Based's feature dimension 16 (273 Taylor features) at N = 512; bf16 in, bf16 out, float64 reference
    q, k, v = (x.to(torch.bfloat16) for x in inputs(512, 512, 16, seed=12))
    normalize = name != "identity"
    out = linear_attention(q, k, v, causal=causal, feature_map=name, normalize=normalize)
    assert out.dtype == torch.bfloat16
    ref = linear_attention(q.double(), k.double(), v.double(), causal=causal, feature_map=name,
                           normalize=normalize, impl="reference")
    assert relative_error(out, ref) < 2e-2


@pytest.mark.parametrize("name", MAP_NAMES)
def test_causal_does_not_look_ahead(name: str) -> None:
    q, k, v = inputs(16, 16, 4, seed=13)
    out = linear_attention(q, k, v, causal=True, feature_map=name, chunk_size=4)
    for t in (0, 6, 14):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1:] += 3 * rand(*x[:, :, t + 1:].shape, seed=20 + t)
        out2 = linear_attention(q2, k2, v2, causal=True, feature_map=name, chunk_size=4)
        torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out2[:, :, t + 1:], out[:, :, t + 1:])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_taylor_gradients(causal: bool) -> None:
    q, k, v = (rand(1, 2, 6, 3, seed=seed).requires_grad_(True) for seed in (14, 15, 16))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return linear_attention(q, k, v, causal=causal, feature_map="taylor", chunk_size=4)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)
    f(q, k, v).square().sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.grad is not None and x.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_taylor_steps_equal_the_causal_pass() -> None:
    q, k, v = inputs(11, 11, 4, seed=16)
    full, (S_full, z_full) = linear_attention(q, k, v, causal=True, feature_map="taylor", return_state=True)
    state, outs = None, []
    for t in range(11):
        o, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                         feature_map="taylor")
        outs.append(o)
    assert relative_error(torch.cat(outs, 2), full) < 1e-10
    assert state[0].shape == (2, 4, 1 + 4 + 16, 5)  # (B, H, 1 + f + f^2, Dv)
    assert relative_error(state[0], S_full) < 1e-10 and relative_error(state[1], z_full) < 1e-10


def test_attention_layer_projects_queries_and_keys_to_feature_dim() -> None:
    torch.manual_seed(0)
    layer = Attention(32, 2, mechanism="linear", causal=True, feature_map="taylor", feature_dim=6).double()
    assert layer.to_q.out_features == 2 * 6 and layer.to_kv.out_features == 2 * (6 + 16)
    x = rand(3, 10, 32, seed=17)
    out = layer(x)
    # by hand: q, k are 6 wide per head, v keeps dim // heads = 16
    q = layer.to_q(x).reshape(3, 10, 2, 6).transpose(1, 2)
    kv = layer.to_kv(x)
    k = kv[..., :12].reshape(3, 10, 2, 6).transpose(1, 2)
    v = kv[..., 12:].reshape(3, 10, 2, 16).transpose(1, 2)
    o = linear_attention(q, k, v, causal=True, feature_map="taylor", impl="reference")  # (B, H, N, 16)
    expected = layer.to_out(o.transpose(1, 2).reshape(3, 10, 32))
    assert relative_error(out, expected) < 1e-12
    # without feature_dim the layer is the one it always was: q, k and v dim // heads wide
    plain = Attention(32, 2, mechanism="linear", feature_map="taylor")
    assert plain.to_q.out_features == 32 and plain.to_kv.out_features == 64
    with pytest.raises(ValueError, match="feature_dim must be a positive integer"):
        Attention(32, 2, mechanism="linear", feature_dim=0)


WORKER = """
import torch
from attnlab.ops.linear import linear_attention
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 4, 37, 4, generator=g, dtype=torch.float64, requires_grad=True)
k = torch.randn(1, 2, 37, 4, generator=g, dtype=torch.float64, requires_grad=True)
v = torch.randn(1, 2, 37, 5, generator=g, dtype=torch.float64, requires_grad=True)
s0 = (torch.rand(1, 4, 21, 5, generator=g, dtype=torch.float64), torch.rand(1, 4, 21, generator=g,
      dtype=torch.float64) + 0.5)
out, (S, z) = linear_attention(q, k, v, causal=True, feature_map="taylor", impl="triton", chunk_size=16,
                               initial_state=s0, return_state=True)
ref, (S_ref, z_ref) = linear_attention(q, k, v, causal=True, feature_map="taylor", impl="reference",
                                       initial_state=s0, return_state=True)
grads = torch.autograd.grad(out.square().sum(), (q, k, v))
ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
rel = lambda a, b: float((a - b).norm() / b.norm())
errors = [rel(out, ref), rel(S, S_ref), rel(z, z_ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
print("ERRORS", max(errors))
"""


def test_taylor_through_the_triton_kernel_under_the_interpreter() -> None:
    # the interpreter must be set before triton is imported: a fresh process
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    error = float(proc.stdout.split("ERRORS")[-1])
    assert error < 1e-10
