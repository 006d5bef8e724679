"""Tensor (Kronecker) attention, Alman & Song arXiv 2310.04064: identities of mechanisms spec section 10."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnlab
from attnlab.nn import TensorAttention
from attnlab.ops import column_kronecker, softmax_attention, tensor_attention
from attnlab.ops.tensor import taylor_error_bound


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bounded(*shape: int, seed: int, bound: float = 0.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform entries in [-bound, bound] (the bounded-entry regime of the fast algorithm)."""
    return ((torch.rand(*shape, generator=seeded(seed), dtype=torch.float64) * 2 - 1) * bound).to(dtype)


def five(B: int = 2, H: int = 2, N: int = 6, D: int = 3, E: int = 4, M1: int | None = None, M2: int | None = None,
         *, seed: int = 0, bound: float = 0.5, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    M1, M2 = M1 or N, M2 or N
    shapes = [(B, H, N, D), (B, H, M1, D), (B, H, M2, D), (B, H, M1, E), (B, H, M2, E)]
    return [bounded(*s, seed=seed + i, bound=bound, dtype=dtype) for i, s in enumerate(shapes)]


def loops(q, k1, k2, v1, v2, *, scale: float, causal: bool = False) -> torch.Tensor:
    """The definition with explicit Python loops over (i, j1, j2), one batch-head at a time."""
    B, H, N, _ = q.shape
    M1, M2, E = k1.shape[2], k2.shape[2], v1.shape[-1]
    out = torch.zeros(B, H, N, E, dtype=torch.float64)
    for b, h, i in itertools.product(range(B), range(H), range(N)):
        weights, values = [], []
        for j1, j2 in itertools.product(range(M1), range(M2)):
            if causal and max(j1, j2) > i + M1 - N:
                continue
            s = sum(float(q[b, h, i, l] * k1[b, h, j1, l] * k2[b, h, j2, l]) for l in range(q.shape[-1]))
            weights.append(math.exp(scale * s))
            values.append(v1[b, h, j1].double() * v2[b, h, j2].double())
        total = sum(weights)
        out[b, h, i] = sum(w / total * v for w, v in zip(weights, values, strict=True))
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("impl", ["reference", "chunked", "taylor"])
def test_matches_explicit_loops(causal: bool, impl: str) -> None:
    q, k1, k2, v1, v2 = five(B=1, H=2, N=4, D=3, E=2, seed=3, bound=0.6)
    expected = loops(q, k1, k2, v1, v2, scale=0.8, causal=causal)
    out = tensor_attention(q, k1, k2, v1, v2, scale=0.8, causal=causal, impl=impl, degree=14)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_cross_lengths_match_explicit_loops() -> None:
    q, k1, k2, v1, v2 = five(B=1, H=1, N=3, D=2, E=3, M1=4, M2=5, seed=11)
    expected = loops(q, k1, k2, v1, v2, scale=1.0)
    for impl in ("reference", "chunked", "taylor"):
        out = tensor_attention(q, k1, k2, v1, v2, impl=impl, degree=14)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_column_kronecker_identity() -> None:
    # (A ⊘ B)^T (C ⊘ D) = (A^T C) ⊙ (B^T D)
    a, b = torch.randn(5, 3, generator=seeded(1), dtype=torch.float64), torch.randn(7, 3, generator=seeded(2),
                                                                                      dtype=torch.float64)
    c, d = torch.randn(5, 4, generator=seeded(3), dtype=torch.float64), torch.randn(7, 4, generator=seeded(4),
                                                                                      dtype=torch.float64)
    left = column_kronecker(a, b).T @ column_kronecker(c, d)
    torch.testing.assert_close(left, (a.T @ c) * (b.T @ d))
    kron = column_kronecker(a, b)
    assert kron.shape == (35, 3)
    torch.testing.assert_close(kron[2 * 7 + 5], a[2] * b[5])


def test_reference_is_the_kronecker_formula() -> None:
    q, k1, k2, v1, v2 = five(N=5, D=3, E=2, seed=20, bound=1.0)
    scores = q @ column_kronecker(k1, k2).transpose(-1, -2) * 0.9  # (B, H, N, N^2)
    expected = torch.softmax(scores, dim=-1) @ column_kronecker(v1, v2)
    torch.testing.assert_close(tensor_attention(q, k1, k2, v1, v2, scale=0.9), expected)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("impl", ["reference", "taylor"])
def test_ones_reduce_to_softmax_attention(causal: bool, impl: str) -> None:
    q, k1, _, v1, _ = five(N=7, D=3, E=5, seed=30, bound=0.5)
    ones_k, ones_v = torch.ones(2, 2, 7, 3, dtype=torch.float64), torch.ones(2, 2, 7, 5, dtype=torch.float64)
    out = tensor_attention(q, k1, ones_k, v1, ones_v, scale=0.7, causal=causal, impl=impl, degree=16)
    expected = softmax_attention(q, k1, v1, scale=0.7, causal=causal, impl="reference")
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-11)


def test_taylor_error_decreases_with_degree() -> None:
    q, k1, k2, v1, v2 = five(N=9, D=3, E=4, seed=40, bound=0.8)
    exact = tensor_attention(q, k1, k2, v1, v2, impl="reference")
    errors = [float((tensor_attention(q, k1, k2, v1, v2, impl="taylor", degree=g) - exact).abs().max())
              for g in range(0, 11)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 1e-3 and errors[-1] < 1e-10, errors


def test_float32_and_bfloat16_keep_the_dtype() -> None:
    q, k1, k2, v1, v2 = five(N=6, D=4, E=4, seed=50)
    exact = tensor_attention(q, k1, k2, v1, v2)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for impl in ("reference", "chunked", "taylor"):
            low = [x.to(dtype) for x in (q, k1, k2, v1, v2)]
            out = tensor_attention(*low, impl=impl, degree=10)
            assert out.dtype == dtype
            assert float((out.double() - exact).norm() / exact.norm()) < tolerance


def test_gradients_of_every_path() -> None:
    inputs = [x.requires_grad_() for x in five(B=1, H=1, N=3, D=2, E=2, seed=60)]
    for impl in ("reference", "chunked", "taylor"):
        for causal in (False, True):
            assert torch.autograd.gradcheck(
                lambda *t, impl=impl, causal=causal: tensor_attention(*t, impl=impl, causal=causal, degree=4), inputs)


def test_causal_does_not_look_ahead() -> None:
    q, k1, k2, v1, v2 = five(N=8, D=3, E=2, seed=70)
    t = 4
    changed = [x.clone() for x in (q, k1, k2, v1, v2)]
    for x in changed:
        x[:, :, t + 1:] = torch.randn(x[:, :, t + 1:].shape, generator=seeded(71), dtype=torch.float64)
    for impl in ("reference", "chunked", "taylor"):
        before = tensor_attention(q, k1, k2, v1, v2, causal=True, impl=impl)
        after = tensor_attention(*changed, causal=True, impl=impl)
        torch.testing.assert_close(before[:, :, : t + 1], after[:, :, : t + 1])
        assert not torch.allclose(before[:, :, t + 1:], after[:, :, t + 1:])


def test_bad_inputs_raise_naming_the_argument() -> None:
    q, k1, k2, v1, v2 = five(N=5, D=3, E=2, seed=80)
    with pytest.raises(ValueError, match="k2 must have the head dim"):
        tensor_attention(q, k1, k2[..., :2], v1, v2)
    with pytest.raises(ValueError, match="v1 must have the length of k1"):
        tensor_attention(q, k1, k2, v1[:, :, :4], v2)
    with pytest.raises(ValueError, match="v1 and v2 must have one value dim"):
        tensor_attention(q, k1, k2, v1, v2[..., :1])
    with pytest.raises(ValueError, match="v2 must have 4 dimensions"):
        tensor_attention(q, k1, k2, v1, v2[0])
    with pytest.raises(TypeError, match="one dtype"):
        tensor_attention(q, k1, k2.float(), v1, v2)
    with pytest.raises(ValueError, match="impl='fast'"):
        tensor_attention(q, k1, k2, v1, v2, impl="fast")
    with pytest.raises(ValueError, match="scale must be a positive"):
        tensor_attention(q, k1, k2, v1, v2, scale=-1.0)
    with pytest.raises(ValueError, match="degree must be >= 0"):
        tensor_attention(q, k1, k2, v1, v2, impl="taylor", degree=-1)
    with pytest.raises(TypeError, match="degree must be an int"):
        tensor_attention(q, k1, k2, v1, v2, degree=2.5)
    with pytest.raises(ValueError, match="C\\(D \\+ degree, degree\\)"):
        tensor_attention(*five(N=2, D=64, E=2, seed=81), impl="taylor", degree=8)
    with pytest.raises(ValueError, match="M1=5 and M2=4"):
        tensor_attention(q, k1, k2[:, :, :4], v1, v2[:, :, :4], causal=True)


def test_layer_shapes_causality_and_taylor_agreement() -> None:
    torch.manual_seed(0)
    layer = TensorAttention(16, 4, causal=True).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64, generator=seeded(90))
    y = layer(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 2, 16, dtype=torch.float64, generator=seeded(91))
    torch.testing.assert_close(layer(x2)[:, :5], y[:, :5])
    taylor = TensorAttention(16, 4, causal=True, impl="taylor", degree=12).double()
    taylor.load_state_dict(layer.state_dict())
    torch.testing.assert_close(taylor(x * 0.3), layer(x * 0.3), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="dim=16"):
        layer(torch.randn(2, 7, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim=10 must be a positive multiple of heads=4"):
        TensorAttention(10, 4)


def test_registered_as_a_layer_with_its_paper() -> None:
    record = attnlab.get("tensor")
    assert record.layer is TensorAttention and record.op is None and record.role == "mixer"
    assert record.arxiv == "2310.04064" and "Kronecker" in record.paper


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_chunked_equals_reference_in_value_and_gradient(causal: bool) -> None:
    from attnlab.ops import tensor_attention_chunked, tensor_attention_reference

    inputs = five(N=9, D=3, E=2, seed=100, bound=1.0)
    weights = torch.randn(2, 2, 9, 2, generator=seeded(101), dtype=torch.float64)
    grads = []
    for run in (lambda *t: tensor_attention_reference(*t, causal=causal),
                lambda *t: tensor_attention_chunked(*t, causal=causal, chunk_size=4)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = run(*leaves)
        (out * weights).sum().backward()
        grads.append((out.detach(), [x.grad for x in leaves]))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for a, b in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        tensor_attention_chunked(*inputs, chunk_size=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("bound", [0.05, 0.1, 0.15])
def test_taylor_error_stays_within_its_documented_bound(causal: bool, bound: float) -> None:
    """|taylor - exact| <= taylor_error_bound * max|v1 ⊙ v2| on fresh bounded inputs, for several degrees."""
    q, k1, k2, v1, v2 = five(N=9, D=3, seed=int(bound * 100) + causal, bound=bound * 4)
    exact = tensor_attention(q, k1, k2, v1, v2, causal=causal, impl="reference")
    scale_v = float((v1[:, :, :, None] * v2[:, :, None]).abs().max())
    for degree in (2, 4, 6):
        error = float((tensor_attention(q, k1, k2, v1, v2, causal=causal, degree=degree, impl="taylor")
                       - exact).abs().max())
        bound_value = taylor_error_bound(q, k1, k2, degree=degree)
        assert bound_value < 1.0  # a bound that says something
        assert error <= bound_value * scale_v + 1e-15, (degree, error, bound_value)  # + float64 rounding


def test_auto_takes_the_taylor_form_only_where_its_bound_holds() -> None:
    """Small entries: "auto" is the Taylor form (bound <= 1e-12 in float64) and equals the exact one;
    entries of size 2: the bound fails and "auto" is the exact chunked form."""
    small = five(N=40, D=2, E=3, seed=50, bound=0.02)
    assert taylor_error_bound(*small[:3], degree=8) <= 1e-12
    auto = tensor_attention(*small, causal=True)
    assert torch.equal(auto, tensor_attention(*small, causal=True, impl="taylor"))
    torch.testing.assert_close(auto, tensor_attention(*small, causal=True, impl="reference"), rtol=1e-10, atol=1e-10)
    large = five(N=40, D=2, E=3, seed=51, bound=2.0)
    assert taylor_error_bound(*large[:3], degree=8) > 1e-7
    assert torch.equal(tensor_attention(*large, causal=True), tensor_attention(*large, causal=True, impl="chunked"))
