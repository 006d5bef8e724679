"""ShortConvolution: the gated form equals its loop transcription, causal (no look-ahead) or centred, the
recurrent step equals the full pass, gradients flow, bad input is refused; in the models: short_conv=0 is the
model it always was, the convolution is the only difference, no look-ahead whatever the mechanism, state sizes."""

from __future__ import annotations

import pytest
import torch

from attnlab.models import LanguageModel, SequenceClassifier, VisionTransformer
from attnlab.nn.short_conv import ShortConvolution, short_conv_layer_indices


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(seed), dtype=torch.float64).to(dtype)


def conv_layer(dim: int, kernel_size: int, *, causal: bool, seed: int = 0) -> ShortConvolution:
    torch.manual_seed(seed)
    layer = ShortConvolution(dim, kernel_size, causal=causal).double()
    with torch.no_grad():  # non-zero biases everywhere, so a wrong offset or a dropped term shows
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=seeded(seed + 1), dtype=p.dtype))
    return layer


def loop_transcription(layer: ShortConvolution, u: torch.Tensor) -> torch.Tensor:
    """``y_t = (sum_k w_k u_{t+k-offset} + b) * (W u_t + c) + u_t`` with zeros outside the sequence, one t and
    one tap at a time (offset K-1 causal, K//2 centred)."""
    B, N, D = u.shape
    K = layer.kernel_size
    w, b = layer.conv.weight[:, 0], layer.conv.bias  # (D, K), (D,)
    offset = K - 1 if layer.causal else K // 2
    out = torch.zeros_like(u)
    for t in range(N):
        acc = b.expand(B, D).clone()
        for tap in range(K):
            s = t + tap - offset
            if 0 <= s < N:
                acc = acc + w[:, tap] * u[:, s]
        out[:, t] = acc * (u[:, t] @ layer.projection.weight.T + layer.projection.bias) + u[:, t]
    return out


# centred kernels are odd (even sizes are refused: test_bad_input_is_refused)
@pytest.mark.parametrize("causal,K", [(True, K) for K in (1, 2, 3, 4, 5)] + [(False, K) for K in (1, 3, 5)],
                         ids=lambda x: ("causal" if x else "centred") if isinstance(x, bool) else f"K{x}")
def test_forward_equals_the_loop_transcription(causal: bool, K: int) -> None:
    layer = conv_layer(6, K, causal=causal, seed=K)
    u = rand(3, 11, 6, seed=10 + K)
    out = layer(u)
    expected = loop_transcription(layer, u).detach()
    assert (out - expected).abs().max() < 1e-12
    out32 = layer.float()(u.float()).detach()
    assert out32.dtype == torch.float32
    assert float((out32.double() - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("K", [2, 3, 4])
def test_causal_convolution_does_not_look_ahead(K: int) -> None:
    layer = conv_layer(5, K, causal=True, seed=3)
    u = rand(2, 16, 5, seed=4)
    out = layer(u)
    for t in (0, 7, 14):
        changed = u.clone()
        changed[:, t + 1:] += 3 * rand(2, 15 - t, 5, seed=t)
        again = layer(changed)
        torch.testing.assert_close(again[:, : t + 1], out[:, : t + 1], rtol=0, atol=0)
        # the next position does see the change (through the current tap and, for K > 1, the past taps)
        assert (again[:, t + 1] - out[:, t + 1]).abs().max() > 1e-3
    # the past reaches exactly K - 1 positions ahead: a change at s moves outputs s .. s + K - 1 only
    changed = u.clone()
    changed[:, 5] += 1.0
    diff = (layer(changed) - out).abs().amax(dim=(0, 2))  # (N,)
    moved = (diff > 1e-12).nonzero().flatten().tolist()
    assert moved == list(range(5, 5 + K))


def test_centred_convolution_reaches_k_over_2_each_side() -> None:
    layer = conv_layer(4, 5, causal=False, seed=5)
    u = rand(2, 12, 4, seed=6)
    changed = u.clone()
    changed[:, 6] += 1.0
    diff = (layer(changed) - layer(u)).abs().amax(dim=(0, 2))  # (N,)
    assert (diff > 1e-12).nonzero().flatten().tolist() == [4, 5, 6, 7, 8]


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_recurrent_step_equals_the_full_pass(K: int) -> None:
    layer = conv_layer(6, K, causal=True, seed=7)
    u = rand(2, 13, 6, seed=8)
    full = layer(u)
    state = None
    steps = []
    for t in range(u.shape[1]):
        y, state = layer.step(u[:, t:t + 1], state)
        steps.append(y)
        assert state.shape == (2, K - 1, 6)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-12
    # the state is the last K - 1 inputs, and continuing from it equals running the longer sequence
    torch.testing.assert_close(state, u[:, u.shape[1] - (K - 1):], rtol=0, atol=0)
    extra = rand(2, 1, 6, seed=9)
    y, _ = layer.step(extra, state)
    torch.testing.assert_close(y, layer(torch.cat([u, extra], dim=1))[:, -1:], rtol=1e-12, atol=1e-12)
    assert layer.state_size == (K - 1) * 6


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
def test_gradients_flow_to_input_and_parameters(causal: bool) -> None:
    layer = conv_layer(3, 3, causal=causal, seed=11)
    u = rand(2, 6, 3, seed=12).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (u,), eps=1e-6, atol=1e-6, rtol=1e-5)
    layer.zero_grad()
    u.grad = None
    layer(u).square().sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("make,error,words", [
    (lambda: ShortConvolution(8, 0), ValueError, "kernel_size must be a positive integer"),
    (lambda: ShortConvolution(8, 2.0), ValueError, "kernel_size must be a positive integer"),
    (lambda: ShortConvolution(0, 3), ValueError, "dim must be a positive integer"),
    (lambda: ShortConvolution(8, 4, causal=False), ValueError, "must be odd"),
    (lambda: ShortConvolution(8, 3, causal=1), TypeError, "causal must be a bool"),
    (lambda: ShortConvolution(8, 3)(torch.randn(2, 5, 7)), ValueError, r"\[B, N, dim=8\]"),
    (lambda: ShortConvolution(8, 3).step(torch.randn(2, 2, 8)), ValueError, "one token"),
    (lambda: ShortConvolution(8, 3).step(torch.randn(2, 1, 8), torch.randn(2, 3, 8)), ValueError, "last K-1"),
    (lambda: ShortConvolution(8, 3, causal=False).step(torch.randn(2, 1, 8)), NotImplementedError, "no step"),
    (lambda: short_conv_layer_indices("last", 2), ValueError, "'all', 'first'"),
    (lambda: short_conv_layer_indices((0, 2), 2), ValueError, "0..1"),
    (lambda: short_conv_layer_indices([0], 2), ValueError, "tuple of block indices"),
])
def test_bad_input_is_refused(make, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        make()


def test_layer_indices() -> None:
    assert short_conv_layer_indices("all", 3) == (0, 1, 2)
    assert short_conv_layer_indices("first", 3) == (0,)
    assert short_conv_layer_indices((2, 0), 3) == (0, 2)


# ------------------------------------------------------------------------------------------------ in the models


def build(kind: str, mechanism: str = "softmax", **options) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "lm":
        return LanguageModel(40, 16, 2, 2, mechanism=mechanism, max_len=12, **options)
    if kind == "classifier":
        return SequenceClassifier(3, 16, 2, 2, mechanism=mechanism, max_len=12, vocab_size=40, **options)
    return VisionTransformer(8, 2, 1, 10, dim=16, depth=2, heads=2, mechanism=mechanism, **options)


def model_input(kind: str) -> torch.Tensor:
    if kind == "vit":
        return torch.rand(2, 1, 8, 8, generator=seeded(30))
    return torch.randint(40, (2, 12), generator=seeded(30))


def by_hand(model: torch.nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The plain pre-norm trunk written out from the model's own sub-modules (no Block.forward)."""
    if kind == "vit":
        p = model.patch_size
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], -1, p * p)
        h = model.embed(patches) + model.position
    else:
        h = model.embed(x) + model.position(torch.arange(x.shape[1]))
    for block in model.trunk.blocks:
        h = h + block.mixer(block.norm1(h))
        h = h + block.mlp(block.norm2(h))
    h = model.trunk.norm(h)
    return model.head(h) if kind == "lm" else model.head(h.mean(dim=1))


@pytest.mark.parametrize("mechanism", ["softmax", "linear"])
@pytest.mark.parametrize("kind", ["lm", "classifier", "vit"])
def test_short_conv_zero_leaves_the_model_unchanged(kind: str, mechanism: str) -> None:
    plain, zero = build(kind, mechanism).eval(), build(kind, mechanism, short_conv=0).eval()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in zero.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values(),
                                                  strict=True))  # same seed, same draws
    assert all(block.short_conv is None for block in zero.trunk.blocks)
    x = model_input(kind)
    with torch.no_grad():
        out = zero(x)
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
        torch.testing.assert_close(out, by_hand(zero, kind, x), rtol=1e-6, atol=1e-6)
    assert zero.state_size == plain.state_size


@pytest.mark.parametrize("kind", ["lm", "classifier", "vit"])
def test_the_convolution_sub_layer_is_the_only_difference(kind: str) -> None:
    plain, conv = build(kind).eval(), build(kind, short_conv=3).eval()
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(f"trunk.blocks.{i}.{name}" for i in range(2) for name in (
        "short_conv.conv.weight", "short_conv.conv.bias", "short_conv.projection.weight",
        "short_conv.projection.bias", "norm_conv.weight", "norm_conv.bias"))
    x = model_input(kind)
    with torch.no_grad():
        assert not torch.allclose(conv(x), plain(x), atol=1e-4)
        for block in conv.trunk.blocks:  # a zero norm output and zero biases make the sub-layer add nothing
            for p in (block.norm_conv.weight, block.norm_conv.bias, block.short_conv.projection.bias):
                p.zero_()
        torch.testing.assert_close(conv(x), plain(x), rtol=1e-6, atol=1e-6)
    # parameters by hand: per convolution K * dim + dim (depthwise filter, bias), dim^2 + dim (gate), 2 dim (norm)
    assert conv.num_parameters - plain.num_parameters == 2 * ((3 * 16 + 16) + (16 * 16 + 16) + 2 * 16)


def test_layer_placement_and_the_convolution_form_per_model() -> None:
    first = build("lm", short_conv=3, short_conv_layers="first")
    assert [b.short_conv is not None for b in first.trunk.blocks] == [True, False]
    assert [b.short_conv is not None for b in build("lm", short_conv=2, short_conv_layers=(1,)).trunk.blocks] == [
        False, True]
    assert first.trunk.blocks[0].short_conv.causal and first.trunk.short_conv_layers == (0,)
    # the bidirectional encoders use a centred kernel; a causal classifier a causal one
    assert not build("classifier", short_conv=3).trunk.blocks[0].short_conv.causal
    assert not build("vit", short_conv=5).trunk.blocks[1].short_conv.causal
    assert build("classifier", short_conv=4, causal=True).trunk.blocks[0].short_conv.causal
    with pytest.raises(ValueError, match="short_conv=4 must be odd in a bidirectional model"):
        build("classifier", short_conv=4)
    with pytest.raises(ValueError, match="short_conv must be a kernel size >= 0"):
        build("lm", short_conv=-1)
    with pytest.raises(ValueError, match="short_conv_layers must be 'all', 'first'"):
        build("lm", short_conv=3, short_conv_layers="last")


def test_gradients_reach_the_convolution_in_a_model() -> None:
    model = build("lm", "linear", short_conv=3, feature_map="taylor", feature_dim=4)
    logits = model(model_input("lm"))
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        if "short_conv" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_state_size_counts_the_features_and_the_convolution() -> None:
    torch.manual_seed(0)
    # Based at zoology's MQAR size: width 64, one head, feature dim 16 (1 + 16 + 256 = 273 features), values
    # 64 wide; the state is S (273 x 64) and z (273) per layer, plus the K - 1 = 2 last inputs of the convolution
    based = LanguageModel(100, 64, 2, 1, mechanism="linear", max_len=64, feature_map="taylor", feature_dim=16,
                          short_conv=3, short_conv_layers="first")
    assert based.state_size == 2 * 273 * (64 + 1) + 2 * 64
    elu = LanguageModel(100, 64, 2, 1, mechanism="linear", max_len=64)
    assert elu.state_size == 2 * 64 * (64 + 1)
    elu_conv = LanguageModel(100, 64, 2, 1, mechanism="linear", max_len=64, short_conv=3)
    assert elu_conv.state_size == elu.state_size + 2 * (2 * 64)
    # softmax keeps every key: no fixed state, with or without the convolution
    assert LanguageModel(100, 64, 2, 1, mechanism="softmax", max_len=64, short_conv=3).state_size is None


def test_the_mqar_benchmark_builds_the_convolution_variant() -> None:
    from attnlab.bench.presets import get_preset
    from attnlab.bench.quality_tasks import TASKS
    from attnlab.tasks.mqar import MQARConfig

    task = TASKS["mqar"]
    config = MQARConfig(vocab_size=64, seq_len=16, num_pairs=2, dim=16, short_conv=3, short_conv_layers="first")
    model = task.build(config, "linear", True)
    assert [b.short_conv is not None for b in model.trunk.blocks] == [True, False]
    assert task.label(config) == "V64-L16-P2-d16-conv3-first"
    assert task.label(MQARConfig(vocab_size=64, seq_len=16, num_pairs=2, dim=16)) == "V64-L16-P2-d16"
    standard = get_preset("standard").tasks["mqar"]
    # every standard MQAR setting is listed without and with the convolution
    plain = {(c.seq_len, c.num_pairs, c.dim) for c in standard if c.short_conv == 0}
    assert plain == {(c.seq_len, c.num_pairs, c.dim) for c in standard if c.short_conv == 3} and len(plain) == 4
