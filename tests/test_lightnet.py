"""LightNet: additive form == log-space recurrence == chunked == per-channel softmax form; overflow; states."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import lightnet_attention, lightnet_attention_step
from attnlab.testing import relative_error


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def additive(q, k, v, *, causal):
    """The paper's additive recurrence, literally: A_t = A_{t-1} + exp(k_t) v_t, Z_t = Z_{t-1} + exp(k_t)."""
    B, H, N, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    A = torch.zeros(B, H, D, v.shape[-1], dtype=torch.float64)
    Z = torch.zeros(B, H, D, dtype=torch.float64)
    outs = []
    for t in range(N):
        A = A + torch.exp(k[:, :, t])[..., None] * v[:, :, t, None, :]
        Z = Z + torch.exp(k[:, :, t])
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], A / Z[..., None]))
    if not causal:
        return torch.einsum("bhnd,bhde->bhne", q, A / Z[..., None])
    return torch.stack(outs, 2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("impl", ["reference", "chunked", "recurrent"])
def test_every_form_equals_the_additive_recurrence(causal: bool, impl: str) -> None:
    q, k, v = rand(2, 4, 21, 6, seed=1), rand(2, 2, 21, 6, seed=2), rand(2, 2, 21, 3, seed=3)
    out = lightnet_attention(q, k, v, causal=causal, chunk_size=5, impl=impl)
    torch.testing.assert_close(out, additive(q, k, v, causal=causal))


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("N,chunk", [(1, 32), (63, 32), (65, 64), (37, 8), (13, 1)], ids=str)
def test_fast_forms_equal_the_reference_with_state(impl: str, causal: bool, N: int, chunk: int) -> None:
    q, k, v = rand(2, 2, N, 8, seed=4), rand(2, 2, N, 8, seed=5), rand(2, 2, N, 4, seed=6)
    s0 = (rand(2, 2, 8, 4, seed=7), rand(2, 2, 8, seed=8) + 2)
    ref, (S_ref, z_ref) = lightnet_attention(q, k, v, causal=causal, initial_state=s0, return_state=True,
                                             impl="reference")
    out, (S, z) = lightnet_attention(q, k, v, causal=causal, chunk_size=chunk, initial_state=s0, return_state=True,
                                     impl=impl)
    assert relative_error(out, ref) < 1e-10
    assert relative_error(S, S_ref) < 1e-10 and relative_error(z, z_ref) < 1e-10
    out32 = lightnet_attention(q.float(), k.float(), v.float(), causal=causal, chunk_size=chunk, impl=impl)
    assert relative_error(out32, lightnet_attention(q, k, v, causal=causal, impl="reference")) < 1e-5


def test_chunked_equals_reference_at_913_tokens() -> None:
    q, k, v = rand(1, 1, 913, 6, seed=9), rand(1, 1, 913, 6, seed=10), rand(1, 1, 913, 4, seed=11)
    ref = lightnet_attention(q, k, v, impl="reference", causal=True)
    for chunk in (32, 64):
        assert relative_error(lightnet_attention(q, k, v, chunk_size=chunk, causal=True), ref) < 1e-10


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_large_keys_and_long_sequences_do_not_overflow(causal: bool) -> None:
    """Adding a constant per channel to k changes no weight (a softmax); the additive form would overflow."""
    q, k, v = (rand(1, 2, 1500, 8, seed=s, dtype=torch.float32) for s in (12, 13, 14))
    shift = torch.linspace(90.0, 400.0, 8)  # exp(90) already overflows float32
    big = lightnet_attention(q, k * 3 + shift, v, causal=causal)
    assert torch.isfinite(big).all()
    small = lightnet_attention(q.double(), k.double() * 3, v.double(), causal=causal)
    assert relative_error(big, small) < 1e-4
    recurrent = lightnet_attention(q[:, :, :200], k[:, :, :200] * 3 + shift, v[:, :, :200], causal=causal,
                                   impl="recurrent")
    assert relative_error(recurrent, small[:, :, :200] if causal else
                          lightnet_attention(q[:, :, :200].double(), k[:, :, :200].double() * 3,
                                             v[:, :, :200].double(), causal=False)) < 1e-4


def test_bidirectional_output_ignores_the_order_of_keys() -> None:
    q, k, v = rand(2, 3, 17, 5, seed=15), rand(2, 3, 17, 5, seed=16), rand(2, 3, 17, 4, seed=17)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(18))
    out = lightnet_attention(q, k, v, causal=False)
    torch.testing.assert_close(lightnet_attention(q, k[:, :, perm], v[:, :, perm], causal=False), out)
    causal = lightnet_attention(q, k, v, causal=True)
    assert not torch.allclose(lightnet_attention(q, k[:, :, perm], v[:, :, perm], causal=True), causal)
    # the last causal row has seen every token: it is the bidirectional row
    torch.testing.assert_close(causal[:, :, -1], out[:, :, -1])


@pytest.mark.parametrize("impl", ["reference", "chunked", "recurrent"])
def test_two_pieces_with_state_equal_one_run(impl: str) -> None:
    q, k, v = rand(2, 2, 33, 8, seed=19), rand(2, 2, 33, 8, seed=20), rand(2, 2, 33, 5, seed=21)
    whole, (S_w, z_w) = lightnet_attention(q, k, v, chunk_size=8, return_state=True, impl=impl, causal=True)
    first, state = lightnet_attention(q[:, :, :14], k[:, :, :14], v[:, :, :14], chunk_size=8, return_state=True,
                                      impl=impl, causal=True)
    second, (S, z) = lightnet_attention(q[:, :, 14:], k[:, :, 14:], v[:, :, 14:], chunk_size=8,
                                        initial_state=state, return_state=True, impl=impl, causal=True)
    torch.testing.assert_close(torch.cat([first, second], 2), whole)
    torch.testing.assert_close(S, S_w)
    torch.testing.assert_close(z, z_w)


def test_step_repeated_equals_the_full_op() -> None:
    q, k, v = rand(1, 4, 15, 6, seed=22), rand(1, 2, 15, 6, seed=23), rand(1, 2, 15, 3, seed=24)
    full = lightnet_attention(q, k, v, causal=True)
    state, outs = None, []
    for t in range(15):
        o, state = lightnet_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), full)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_causal_with_more_keys_and_a_key_gain(causal: bool) -> None:
    q, k, v = rand(1, 2, 6, 4, seed=25), rand(1, 2, 10, 4, seed=26), rand(1, 2, 10, 3, seed=27)
    gain = rand(1, 2, 10, 4, seed=28)
    ref = lightnet_attention(q, k, v, causal=causal, key_gain=gain, impl="reference")
    for impl in ("chunked", "recurrent"):
        torch.testing.assert_close(lightnet_attention(q, k, v, causal=causal, key_gain=gain, chunk_size=4,
                                                      impl=impl), ref)
    # independent check of the gain: o_t = sum_c q_t[c] sum_s w_ts[c] g_s[c] v_s
    allowed = torch.arange(10)[None, :] <= torch.arange(6)[:, None] + 4 if causal else torch.ones(6, 10).bool()
    logits = k[:, :, None].expand(1, 2, 6, 10, 4).masked_fill(~allowed[None, None, :, :, None], float("-inf"))
    w = torch.softmax(logits, dim=3)  # (B, H, t, s, c)
    expected = torch.einsum("bhtc,bhtsc,bhsc,bhse->bhte", q, w, gain, v)
    torch.testing.assert_close(ref, expected)


def test_gradients_of_the_chunked_form_match_the_reference() -> None:
    q, k, v = (rand(1, 2, 23, 4, seed=s).requires_grad_() for s in (29, 30, 31))
    grads = []
    for impl in ("reference", "chunked"):
        out = lightnet_attention(q, k, v, chunk_size=6, impl=impl, causal=True)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        assert relative_error(b, a) < 1e-10
    assert torch.autograd.gradcheck(lambda q, k, v: lightnet_attention(q, k, v, chunk_size=3, impl="recurrent",
                                                                       causal=True),
                                    (q[:, :, :7], k[:, :, :7], v[:, :, :7]))


@pytest.mark.parametrize("kwargs,error,words", [
    ({"initial_state": torch.zeros(1, 2, 4, 4)}, TypeError, "initial_state must be the tuple"),
    ({"initial_state": (torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3))}, ValueError, "initial_state[1] (z)"),
    ({"key_gain": torch.zeros(1, 2, 5, 4)}, ValueError, "key_gain of shape (1, 2, 5, 4)"),
    ({"chunk_size": 0}, ValueError, "chunk_size=0"),
    ({"impl": "scan"}, ValueError, "impl='scan'"),
])
def test_bad_options_raise_naming_the_argument(kwargs: dict, error: type, words: str) -> None:
    q = rand(1, 2, 6, 4)
    with pytest.raises(error) as info:
        lightnet_attention(q, q, q, **kwargs, causal=True)
    assert words in str(info.value)


@pytest.mark.parametrize("grid", [None, (4, 5), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_md_lrpe_scores_depend_only_on_the_per_axis_offset(grid) -> None:
    """<phi(q)_s, phi(k)_t> = sum_j q_j k_j cos(theta_j (p_s,g(j) - p_t,g(j))) (spec section 2, MD-LRPE)."""
    from attnlab.nn import lrpe_theta, md_lrpe, md_lrpe_angles

    d, prefix = 7, 2
    shape = (24,) if grid is None else grid
    cells = 1
    for n in shape:
        cells *= n
    N = cells + prefix
    theta = lrpe_theta(3, d, len(shape)).double()
    angles = md_lrpe_angles(theta, N, head_dim=d, shape=shape)  # (H, N, d)
    q, k = rand(1, 3, 1, d, seed=32).expand(1, 3, N, d), rand(1, 3, 1, d, seed=33).expand(1, 3, N, d)
    scores = torch.einsum("bhsd,bhtd->bhst", md_lrpe(q, angles), md_lrpe(k, angles))  # same q, k at every position
    coords = torch.stack(torch.unravel_index(torch.arange(cells), shape), -1).double()  # (cells, m)
    e = theta.shape[1]
    for s, t in [(0, 5), (3, 3), (7, cells - 1), (cells - 1, 1)]:
        offset = coords[s] - coords[t]
        turn = torch.stack([theta[:, j % e] * offset[j // e] for j in range(d)], -1)  # (H, d)
        expected = (q[0, :, 0] * k[0, :, 0] * torch.cos(turn)).sum(-1)
        torch.testing.assert_close(scores[0, :, prefix + s, prefix + t], expected)
    # prefix (CLS) tokens are not encoded: [x, 0]
    plain = torch.cat([q, torch.zeros_like(q)], -1)
    torch.testing.assert_close(md_lrpe(q, angles)[:, :, :prefix], plain[:, :, :prefix])


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_lightnet_layer_is_the_documented_composition(causal: bool) -> None:
    """Explicit quadratic form with the relative LRPE factor cos(angle_t - angle_s), then gate, RMSNorm, W_o."""
    from attnlab.nn import LightNetAttention, md_lrpe_angles

    torch.manual_seed(1)
    layer = LightNetAttention(16, 2, causal=causal, grid=(3, 4), chunk_size=4).double()
    B, N = 2, 13
    x = rand(B, N, 16, seed=34)
    q = torch.nn.functional.silu(layer.q_proj(x)).reshape(B, N, 2, 8).transpose(1, 2)
    k = layer.k_proj(x).reshape(B, N, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).reshape(B, N, 2, 8).transpose(1, 2)
    angles = md_lrpe_angles(layer.theta.double(), N, head_dim=8, shape=(3, 4))  # (H, N, d)
    allowed = torch.ones(N, N).tril().bool() if causal else torch.ones(N, N).bool()
    w = torch.softmax(k[:, :, None].expand(B, 2, N, N, 8).masked_fill(~allowed[None, None, :, :, None],
                                                                       float("-inf")), dim=3)  # (B, H, t, s, c)
    rel = torch.cos(angles[:, :, None] - angles[:, None, :])  # (H, t, s, c)
    o = torch.einsum("bhtc,bhtsc,htsc,bhse->bhte", q, w, rel, v).transpose(1, 2).reshape(B, N, 16)
    o = o * torch.sigmoid(layer.gate(x))
    o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + 1e-5) * layer.norm.weight
    torch.testing.assert_close(layer(x), layer.out_proj(o))


def test_lightnet_layer_without_lrpe_is_permutation_equivariant_when_bidirectional() -> None:
    from attnlab.nn import LightNetAttention

    torch.manual_seed(2)
    layer = LightNetAttention(16, 2, use_lrpe=False).double()
    x = rand(1, 11, 16, seed=35)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(36))
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm])
    with_lrpe = LightNetAttention(16, 2).double()
    assert not torch.allclose(with_lrpe(x[:, perm]), with_lrpe(x)[:, perm])


def test_padded_blocks_keep_gradients_finite_for_very_negative_keys() -> None:
    """N not a multiple of the block and keys near -800: every weight stays finite, forward and backward."""
    q, k, v = (rand(1, 2, 11, 4, seed=s).requires_grad_() for s in (37, 38, 39))
    grads = []
    for impl in ("reference", "chunked"):
        out = lightnet_attention(q, k * 2 - 400.0, v, chunk_size=4, impl=impl, causal=True)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(b).all() and relative_error(b, a) < 1e-10


def test_a_key_jump_beyond_the_float32_range_takes_the_pairwise_form() -> None:
    """A key 120 above its block's earlier keys (exp(120) overflows float32): the factorised blocks
    would overflow, so the op uses the pairwise blocks; the result stays the float64 reference's."""
    q, k, v = (rand(1, 2, 100, 8, seed=s, dtype=torch.float32) for s in (40, 41, 42))
    k[:, :, 37] += 120.0
    out = lightnet_attention(q, k, v, causal=True, chunk_size=16)
    assert torch.isfinite(out).all()
    expected = lightnet_attention(q.double(), k.double(), v.double(), causal=True, impl="reference")
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("dtype,N,tolerance", [(torch.float32, 2048, 1e-5), (torch.bfloat16, 4096, 2e-2)],
                         ids=["float32-N2048", "bf16-N4096"])
def test_factorised_blocks_at_realistic_lengths(dtype: torch.dtype, N: int, tolerance: float) -> None:
    q, k, v = (rand(1, 2, N, 32, seed=s, dtype=torch.float32).to(dtype) for s in (43, 44, 45))
    out = lightnet_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    expected = lightnet_attention(q.double(), k.double(), v.double(), causal=True, impl="recurrent")
    assert relative_error(out, expected) < tolerance


def test_factorised_blocks_gradients_over_many_blocks() -> None:
    q, k, v = (rand(1, 2, 203, 6, seed=s).requires_grad_() for s in (46, 47, 48))
    gain = rand(1, 2, 203, 6, seed=49).abs()
    grads = []
    for impl in ("reference", "chunked"):
        out = lightnet_attention(q, k, v, causal=True, chunk_size=16, key_gain=gain, impl=impl)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*grads, strict=True):
        assert relative_error(b, a) < 1e-10


@pytest.mark.parametrize("gain", [False, True], ids=["no-gain", "broadcast-gain"])
def test_segmented_causal_equals_reference(monkeypatch: pytest.MonkeyPatch, gain: bool) -> None:
    """Long causal inputs run segment by segment with (S, z) carried; forced here with a tiny segment size."""
    import attnlab.ops.lightning as lightning_module

    monkeypatch.setattr(lightning_module, "SEGMENT_BYTES", 1 << 12)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 70, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s0 = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64),
          torch.randn(2, 4, 8, generator=gen, dtype=torch.float64))
    key_gain = torch.rand(1, 4, 1, 8, generator=gen, dtype=torch.float64) + 0.5 if gain else None
    options = dict(causal=True, chunk_size=8, initial_state=s0, return_state=True, key_gain=key_gain)
    out, (S, z) = lightnet_attention(q, k, v, **options)
    ref, (S_ref, z_ref) = lightnet_attention(q, k, v, **options, impl="reference")
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got, want = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    assert max(relative_error(out, ref), relative_error(S, S_ref), relative_error(z, z_ref)) < 1e-10
    assert all(relative_error(a, b) < 1e-10 for a, b in zip(got, want, strict=True))
    with torch.no_grad():
        assert relative_error(lightnet_attention(q, k, v, causal=True, chunk_size=8, initial_state=s0,
                                                 key_gain=key_gain), ref) < 1e-10
