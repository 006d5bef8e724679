"""Linear attention: quadratic == chunked == recurrent == step, feature maps, states, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.ops import linear_attention, linear_attention_step
from attnlab.testing import relative_error


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def oracle(q, k, v, phi, *, causal, normalize=True, eps=1e-6, scale=1.0):
    """Independent loop over queries of the paper's eq. 4 with an explicit similarity phi(q).phi(k)."""
    B, H, N, _ = q.shape
    M = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for i in range(N):
        last = i + M - N if causal else M - 1
        sim = (phi(q[:, :, i, None]) * phi(k[:, :, : last + 1])).sum(-1) * scale  # (B, H, j)
        num = (sim[..., None] * v[:, :, : last + 1]).sum(2)
        out[:, :, i] = num / (sim.sum(-1, keepdim=True) + eps) if normalize else num
    return out


MAPS = {"elu+1": lambda x: F.elu(x) + 1, "relu": torch.relu, "identity": lambda x: x}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("feature_map,normalize", [("elu+1", True), ("relu", True), ("identity", False),
                                                   ("elu+1", False)])
def test_reference_matches_the_papers_equation(causal: bool, feature_map: str, normalize: bool) -> None:
    q, k, v = rand(2, 4, 9, 6, seed=1), rand(2, 2, 12, 6, seed=2), rand(2, 2, 12, 3, seed=3)
    out = linear_attention(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, scale=0.5,
                           impl="reference")
    expected = oracle(q, k, v, MAPS[feature_map], causal=causal, normalize=normalize, scale=0.5)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("N,chunk", [(1, 64), (63, 64), (65, 64), (913, 64), (37, 8), (13, 1)], ids=str)
def test_fast_forms_equal_the_quadratic_form(impl: str, causal: bool, N: int, chunk: int) -> None:
    if impl == "recurrent" and N > 100:
        N = 97
    q, k, v = rand(2, 4, N, 16, seed=4), rand(2, 2, N, 16, seed=5), rand(2, 2, N, 8, seed=6)
    s0 = (rand(2, 4, 16, 8, seed=7), rand(2, 4, 16, seed=8).abs())
    ref, (S_ref, z_ref) = linear_attention(q, k, v, causal=causal, initial_state=s0, return_state=True,
                                           impl="reference")
    out, (S, z) = linear_attention(q, k, v, causal=causal, chunk_size=chunk, initial_state=s0, return_state=True,
                                   impl=impl)
    assert relative_error(out, ref) < 1e-10
    assert relative_error(S, S_ref) < 1e-10 and relative_error(z, z_ref) < 1e-10
    out32 = linear_attention(q.float(), k.float(), v.float(), causal=causal, chunk_size=chunk, impl=impl)
    assert out32.dtype == torch.float32
    assert relative_error(out32, linear_attention(q, k, v, causal=causal, impl="reference")) < 1e-5


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_causal_with_more_keys_aligns_queries_to_the_end(impl: str) -> None:
    q, k, v = rand(1, 2, 5, 4, seed=9), rand(1, 2, 11, 4, seed=10), rand(1, 2, 11, 4, seed=11)
    out = linear_attention(q, k, v, causal=True, chunk_size=2, impl=impl)
    torch.testing.assert_close(out, oracle(q, k, v, MAPS["elu+1"], causal=True))
    # the last query sees every key: the same as bidirectional for that row
    torch.testing.assert_close(out[:, :, -1], linear_attention(q, k, v)[:, :, -1])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_callable_feature_map_may_change_the_width(causal: bool) -> None:
    def squares(x: torch.Tensor) -> torch.Tensor:  # a positive map to 2D features
        return torch.cat([x.square(), torch.sigmoid(x)], dim=-1)

    q, k, v = rand(1, 2, 10, 4, seed=12), rand(1, 2, 10, 4, seed=13), rand(1, 2, 10, 3, seed=14)
    out, (S, z) = linear_attention(q, k, v, causal=causal, feature_map=squares, chunk_size=3, return_state=True)
    torch.testing.assert_close(out, oracle(q, k, v, squares, causal=causal))
    assert S.shape == (1, 2, 8, 3) and z.shape == (1, 2, 8)


@pytest.mark.parametrize("impl", ["reference", "chunked", "recurrent"])
def test_two_pieces_with_state_equal_one_run(impl: str) -> None:
    q, k, v = rand(2, 4, 41, 8, seed=15), rand(2, 4, 41, 8, seed=16), rand(2, 4, 41, 6, seed=17)
    whole, (S_whole, z_whole) = linear_attention(q, k, v, causal=True, chunk_size=8, return_state=True, impl=impl)
    first, state = linear_attention(q[:, :, :17], k[:, :, :17], v[:, :, :17], causal=True, chunk_size=8,
                                    return_state=True, impl=impl)
    second, (S, z) = linear_attention(q[:, :, 17:], k[:, :, 17:], v[:, :, 17:], causal=True, chunk_size=8,
                                      initial_state=state, return_state=True, impl=impl)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole)
    torch.testing.assert_close(S, S_whole)
    torch.testing.assert_close(z, z_whole)


def test_step_repeated_equals_the_full_op() -> None:
    q, k, v = rand(2, 4, 19, 8, seed=18), rand(2, 2, 19, 8, seed=19), rand(2, 2, 19, 5, seed=20)
    full, (S_full, _) = linear_attention(q, k, v, causal=True, feature_map="relu", scale=0.3, return_state=True)
    state, outs = None, []
    for t in range(19):
        o, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                         feature_map="relu", scale=0.3)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full)
    torch.testing.assert_close(state[0], S_full)


def test_normalised_output_is_a_convex_combination_of_values() -> None:
    """With a positive feature map each output row is a weighted average of the values it sees."""
    q, k = rand(1, 1, 30, 4, seed=21), rand(1, 1, 30, 4, seed=22)
    v = rand(1, 1, 30, 1, seed=23)
    out = linear_attention(q, k, v, causal=True, eps=0.0)
    running_max = torch.cummax(v[0, 0, :, 0], 0).values
    running_min = -torch.cummax(-v[0, 0, :, 0], 0).values
    assert bool((out[0, 0, :, 0] <= running_max + 1e-12).all() and (out[0, 0, :, 0] >= running_min - 1e-12).all())


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_gradients_equal_the_quadratic_gradients(causal: bool) -> None:
    q, k, v = (rand(2, 2, 50, 8, seed=s).requires_grad_() for s in (24, 25, 26))
    grads = []
    for impl in ("reference", "chunked"):
        out = linear_attention(q, k, v, causal=causal, chunk_size=16, impl=impl)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        assert relative_error(b, a) < 1e-10


def test_gradcheck_through_the_state() -> None:
    q, k, v = (rand(1, 2, 6, 3, seed=s).requires_grad_() for s in (27, 28, 29))
    S0, z0 = rand(1, 2, 3, 3, seed=30).requires_grad_(), (rand(1, 2, 3, seed=31).abs() + 1).requires_grad_()

    def f(q, k, v, S0, z0):
        out, (S, z) = linear_attention(q, k, v, causal=True, chunk_size=4, initial_state=(S0, z0), return_state=True)
        return out, S, z

    assert torch.autograd.gradcheck(f, (q, k, v, S0, z0))


@pytest.mark.parametrize("kwargs,error,words", [
    ({"feature_map": "softmax"}, ValueError, "feature_map='softmax' is not one of"),
    ({"feature_map": 3}, TypeError, "feature_map must be a name or a callable"),
    ({"feature_map": lambda x: x.sum(-1)}, ValueError, "feature_map must map q"),
    ({"eps": -1.0}, ValueError, "eps=-1.0"),
    ({"chunk_size": -4}, ValueError, "chunk_size=-4"),
    ({"initial_state": torch.zeros(1, 2, 4, 4)}, TypeError, "initial_state must be the tuple"),
    ({"initial_state": (torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 5))}, ValueError, "initial_state[1] (z)"),
    ({"impl": "fused"}, ValueError, "impl='fused'"),
    ({"scale": 0.0}, ValueError, "scale"),
])
def test_bad_options_raise_naming_the_argument(kwargs: dict, error: type, words: str) -> None:
    q = rand(1, 2, 6, 4)
    with pytest.raises(error) as info:
        linear_attention(q, q, q, **kwargs)
    assert words in str(info.value)


def test_causal_with_more_queries_than_keys_is_an_error() -> None:
    with pytest.raises(ValueError, match="N=6 queries and M=3 keys"):
        linear_attention(rand(1, 1, 6, 4), rand(1, 1, 3, 4), rand(1, 1, 3, 4), causal=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_segmented_causal_equals_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tol: float) -> None:
    """Long causal inputs run segment by segment with (S, z) carried; forced here with a tiny segment size."""
    import attnlab.ops.lightning as lightning_module

    monkeypatch.setattr(lightning_module, "SEGMENT_BYTES", 1 << 12)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 70, 8, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    s0 = (torch.randn(2, 4, 8, 8, generator=gen, dtype=dtype), torch.rand(2, 4, 8, generator=gen, dtype=dtype) + 1)
    options = dict(causal=True, chunk_size=8, initial_state=s0, return_state=True)
    out, (S, z) = linear_attention(q, k, v, **options)
    ref, (S_ref, z_ref) = linear_attention(q, k, v, **options, impl="reference")
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    got, want = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    assert max(relative_error(out, ref), relative_error(S, S_ref), relative_error(z, z_ref)) < tol
    assert all(relative_error(a, b) < tol for a, b in zip(got, want, strict=True))
    with torch.no_grad():
        assert relative_error(linear_attention(q, k, v, causal=True, chunk_size=8, initial_state=s0), ref) < tol
