"""Lightning attention: masked == chunked == recurrent == step, states, decay schedule, errors."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.ops import (
    lightning_attention,
    lightning_attention_step,
    lightning_decay_slopes,
)
from attnlab.testing import relative_error


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def oracle(q, k, v, rates, scale=1.0):
    """Independent double loop over (t, j): o_t = scale * sum_{j<=t} exp(-s_h (t-j)) (q_t . k_j) v_j."""
    B, H, N, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        lam = math.exp(-float(rates[h]))
        for t in range(N):
            for j in range(t + 1):
                w = (q[:, h, t] * k[:, h, j]).sum(-1, keepdim=True) * lam ** (t - j)
                out[:, h, t] += w * v[:, h, j]
    return out * scale


DECAYS = [
    pytest.param(None, id="no-decay"),
    pytest.param(0.2, id="float"),
    pytest.param(torch.tensor([0.0, 0.03, 0.4, 2.5]), id="per-head"),
]


@pytest.mark.parametrize("decay", DECAYS)
def test_reference_matches_an_explicit_double_loop(decay) -> None:
    q, k, v = rand(2, 4, 11, 5, seed=1), rand(2, 2, 11, 5, seed=2), rand(2, 2, 11, 3, seed=3)
    rates = torch.zeros(4) if decay is None else torch.as_tensor(decay).expand(4)
    out = lightning_attention(q, k, v, decay=decay, scale=0.7, impl="reference")
    torch.testing.assert_close(out, oracle(q, k, v, rates, scale=0.7))


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("N,chunk", [(1, 64), (63, 64), (65, 64), (913, 64), (37, 8), (40, 8), (13, 1)],
                         ids=lambda x: str(x))
def test_fast_forms_equal_the_masked_form(impl: str, decay, N: int, chunk: int) -> None:
    if impl == "recurrent" and N > 100:
        N = 97  # the token loop is slow; the chunked form covers the long length
    q, k, v = rand(2, 4, N, 16, seed=4), rand(2, 2, N, 16, seed=5), rand(2, 2, N, 8, seed=6)
    s0 = rand(2, 4, 16, 8, seed=7)
    ref, ref_state = lightning_attention(q, k, v, decay=decay, initial_state=s0, return_state=True, impl="reference")
    out, state = lightning_attention(q, k, v, decay=decay, chunk_size=chunk, initial_state=s0, return_state=True,
                                     impl=impl)
    assert relative_error(out, ref) < 1e-10 and relative_error(state, ref_state) < 1e-10
    out32 = lightning_attention(q.float(), k.float(), v.float(), decay=decay, chunk_size=chunk, impl=impl)
    ref_plain = lightning_attention(q, k, v, decay=decay, impl="reference")
    assert out32.dtype == torch.float32
    assert relative_error(out32, ref_plain) < 1e-5


def test_no_decay_is_the_causally_masked_product_times_scale() -> None:
    q, k, v = rand(1, 3, 50, 8, seed=8), rand(1, 3, 50, 8, seed=9), rand(1, 3, 50, 4, seed=10)
    expected = ((q @ k.transpose(-1, -2)) * torch.ones(50, 50, dtype=torch.float64).tril()) @ v * 0.125
    for impl in ("reference", "chunked", "recurrent"):
        torch.testing.assert_close(lightning_attention(q, k, v, scale=0.125, chunk_size=16, impl=impl), expected)


@pytest.mark.parametrize("impl", ["reference", "chunked", "recurrent"])
@pytest.mark.parametrize("decay", DECAYS)
def test_two_pieces_with_state_equal_one_run(impl: str, decay) -> None:
    q, k, v = rand(2, 4, 45, 8, seed=11), rand(2, 4, 45, 8, seed=12), rand(2, 4, 45, 6, seed=13)
    whole, whole_state = lightning_attention(q, k, v, decay=decay, chunk_size=8, return_state=True, impl=impl)
    first, state = lightning_attention(q[:, :, :19], k[:, :, :19], v[:, :, :19], decay=decay, chunk_size=8,
                                       return_state=True, impl=impl)
    second, final = lightning_attention(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:], decay=decay, chunk_size=8,
                                        initial_state=state, return_state=True, impl=impl)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole)
    torch.testing.assert_close(final, whole_state)


@pytest.mark.parametrize("decay", DECAYS)
def test_step_repeated_equals_the_full_op(decay) -> None:
    q, k, v = rand(2, 4, 23, 8, seed=14), rand(2, 1, 23, 8, seed=15), rand(2, 1, 23, 5, seed=16)
    full, full_state = lightning_attention(q, k, v, decay=decay, scale=0.5, return_state=True)
    state = None
    outs = []
    for t in range(23):
        o, state = lightning_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                            decay=decay, scale=0.5)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), full)
    torch.testing.assert_close(state, full_state)


def test_decay_forgets_the_past() -> None:
    """A strong decay makes o_t depend (numerically) only on the last few tokens."""
    q, k, v = rand(1, 1, 40, 4, seed=17), rand(1, 1, 40, 4, seed=18), rand(1, 1, 40, 4, seed=19)
    k2 = k.clone()
    k2[:, :, :10] += 5.0
    strong_a = lightning_attention(q, k, v, decay=5.0, chunk_size=8)
    strong_b = lightning_attention(q, k2, v, decay=5.0, chunk_size=8)
    torch.testing.assert_close(strong_a[:, :, 30:], strong_b[:, :, 30:], rtol=0, atol=1e-30)
    weak_a = lightning_attention(q, k, v, decay=0.01, chunk_size=8)
    weak_b = lightning_attention(q, k2, v, decay=0.01, chunk_size=8)
    assert (weak_a[:, :, 30:] - weak_b[:, :, 30:]).abs().max() > 1e-2


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_gradcheck_including_state_and_learned_decay(impl: str) -> None:
    q, k, v = (rand(1, 2, 7, 3, seed=s).requires_grad_() for s in (20, 21, 22))
    s0 = rand(1, 2, 3, 3, seed=23).requires_grad_()
    decay = torch.tensor([0.1, 0.7], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, s0, decay):
        out, state = lightning_attention(q, k, v, decay=decay, chunk_size=3, initial_state=s0, return_state=True,
                                         impl=impl)
        return out, state

    assert torch.autograd.gradcheck(f, (q, k, v, s0, decay))


def test_chunked_gradients_equal_the_masked_form_gradients() -> None:
    q, k, v = (rand(2, 4, 77, 16, seed=s).requires_grad_() for s in (24, 25, 26))
    grads = []
    for impl in ("reference", "chunked"):
        out = lightning_attention(q, k, v, decay=torch.tensor([0.0, 0.1, 0.3, 1.0]), chunk_size=16, impl=impl)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        assert relative_error(b, a) < 1e-10


def test_bfloat16_long_sequence_stays_close() -> None:
    q, k, v = (rand(1, 2, 1500, 64, seed=s, dtype=torch.bfloat16) * 0.3 for s in (27, 28, 29))
    out = lightning_attention(q, k, v, decay=torch.tensor([0.0, 0.02]))
    assert out.dtype == torch.bfloat16
    expected = lightning_attention(q.double(), k.double(), v.double(), decay=torch.tensor([0.0, 0.02]),
                                   impl="reference")
    assert relative_error(out, expected) < 2e-2


def test_decay_slopes_follow_the_alibi_schedule() -> None:
    for H in (1, 2, 4, 8, 16):
        expected = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)]) * (1 + 1e-5)
        torch.testing.assert_close(lightning_decay_slopes(H), expected)
    # non power of two: the 4 slopes of H=4, then every other slope of H=8
    six = torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]) * (1 + 1e-5)
    torch.testing.assert_close(lightning_decay_slopes(6), six)
    layers = [lightning_decay_slopes(4, layer_idx=i, num_layers=5) for i in range(5)]
    base = torch.tensor([2 ** (-2 * (h + 1)) for h in range(4)])
    for i, slopes in enumerate(layers):
        torch.testing.assert_close(slopes, base * (1 - i / 4 + 1e-5))
    assert float(layers[-1].max()) < 1e-4  # the last layer barely decays


@pytest.mark.parametrize("kwargs,error,words", [
    ({"decay": -0.1}, ValueError, "decay"),
    ({"decay": torch.tensor([0.1, -0.2, 0.3, 0.4])}, ValueError, "s_h >= 0"),
    ({"decay": torch.tensor([0.1, 0.2])}, ValueError, "[H] = [4]"),
    ({"decay": torch.tensor([1, 2, 3, 4])}, TypeError, "decay must be a floating tensor"),
    ({"decay": "fast"}, TypeError, "decay must be None, a float"),
    ({"decay": float("nan")}, ValueError, "decay"),
    ({"chunk_size": 0}, ValueError, "chunk_size=0"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size"),
    ({"initial_state": torch.zeros(1, 4, 8, 7, dtype=torch.float64)}, ValueError, "initial_state must have shape"),
    ({"impl": "triton-on-cpu"}, ValueError, "impl='triton-on-cpu'"),
    ({"scale": -1.0}, ValueError, "scale"),
])
def test_bad_options_raise_naming_the_argument(kwargs: dict, error: type, words: str) -> None:
    q = rand(1, 4, 6, 8)
    with pytest.raises(error) as info:
        lightning_attention(q, q, q, **kwargs)
    assert words in str(info.value)


def test_keys_of_another_length_are_refused() -> None:
    with pytest.raises(ValueError, match="length of q"):
        lightning_attention(rand(1, 2, 5, 4), rand(1, 2, 7, 4), rand(1, 2, 7, 4))


def test_step_refuses_more_than_one_token() -> None:
    q = rand(1, 2, 3, 4)
    with pytest.raises(ValueError, match="one token"):
        lightning_attention_step(q, q, q)


@pytest.mark.parametrize("kwargs,error", [({"heads": 0}, ValueError), ({"heads": 4, "layer_idx": 4,
                                                                          "num_layers": 4}, ValueError),
                                          ({"heads": 4.0}, TypeError)])
def test_decay_slopes_bad_arguments(kwargs: dict, error: type) -> None:
    heads = kwargs.pop("heads")
    with pytest.raises(error):
        lightning_decay_slopes(heads, **kwargs)


def test_tnl_layer_is_the_documented_composition() -> None:
    """TNLAttention == SiLU projections -> masked lightning form with the layer's decay -> LN -> gate -> W_o."""
    from attnlab.nn import TNLAttention

    torch.manual_seed(0)
    layer = TNLAttention(32, 4, layer_idx=2, num_layers=4, chunk_size=8).double()
    x = rand(2, 21, 32, seed=40)
    rates = torch.tensor([2 ** (-2 * (h + 1)) for h in range(4)], dtype=torch.float64) * (1 - 2 / 3 + 1e-5)
    torch.testing.assert_close(layer.decay.double(), rates)

    def heads(t):
        return torch.nn.functional.silu(t).reshape(2, 21, 4, 8).transpose(1, 2)

    q, k, v = heads(layer.q_proj(x)), heads(layer.k_proj(x)), heads(layer.v_proj(x))
    o = oracle(q, k, v, rates).transpose(1, 2).reshape(2, 21, 32)
    o = torch.nn.functional.layer_norm(o, (32,), layer.norm.weight, layer.norm.bias, 1e-5)
    gate = torch.sigmoid(x @ layer.gate[0].weight.T @ layer.gate[1].weight.T)
    expected = (o * gate) @ layer.out_proj.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_tnl_layer_is_causal_only_and_the_plain_op_fits_the_generic_layer() -> None:
    import attnlab
    from attnlab.nn import TNLAttention

    with pytest.raises(NotImplementedError, match="causal attention only"):
        TNLAttention(16, 2, causal=False)
    layer = attnlab.nn.Attention(16, 2, mechanism="lightning", causal=True, decay=0.1)
    assert layer(rand(1, 9, 16, seed=41, dtype=torch.float32)).shape == (1, 9, 16)


# ----------------------------------------------------------------------------------------------------
# segments: long inputs run in pieces with the state carried (forced here with a tiny segment size)


@pytest.mark.parametrize("decay", [None, "slopes"], ids=["no-decay", "decay"])
def test_segmented_chunked_equals_reference(monkeypatch: pytest.MonkeyPatch, decay: str | None) -> None:
    import attnlab.ops.lightning as lightning_module

    monkeypatch.setattr(lightning_module, "SEGMENT_BYTES", 1 << 12)  # segments of one 8-token chunk
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 4, 75, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rates = lightning_decay_slopes(4) if decay else None
    s0 = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    assert lightning_module.segment_length(q, v, 8) < 75  # several segments do run
    out, state = lightning_attention(q, k, v, decay=rates, chunk_size=8, initial_state=s0, return_state=True)
    ref, ref_state = lightning_attention(q, k, v, decay=rates, chunk_size=8, initial_state=s0, return_state=True,
                                         impl="reference")
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got, want = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    assert relative_error(out, ref) < 1e-10 and relative_error(state, ref_state) < 1e-10
    assert all(relative_error(a, b) < 1e-10 for a, b in zip(got, want, strict=True))
    with torch.no_grad():  # the path that writes each segment into one output tensor
        assert relative_error(lightning_attention(q, k, v, decay=rates, chunk_size=8, initial_state=s0), ref) < 1e-10
