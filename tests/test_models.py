"""Models: shapes, causality, refusals with reasons, fair parameter counts, state size, required options."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import attnlab
from attnlab.models import (
    LanguageModel,
    MechanismMismatch,
    SequenceClassifier,
    VisionTransformer,
    build_mixer,
    count_parameters,
    mixer_refusal,
)
from attnlab.registry import _REGISTRY


@pytest.fixture
def fake_mechanisms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variants of softmax with other metadata: bidirectional-only, causal-only, a cross layer, a state size."""
    softmax = attnlab.get("softmax")
    fakes = {
        "fake_bidirectional": dataclasses.replace(softmax, name="fake_bidirectional", supports_causal=False),
        "fake_causal": dataclasses.replace(softmax, name="fake_causal", supports_bidirectional=False),
        "fake_cross": dataclasses.replace(softmax, name="fake_cross", role="cross"),
        "fake_recurrent": dataclasses.replace(softmax, name="fake_recurrent",
                                              state_size=lambda heads, dk, dv: heads * dk * dv),
    }
    for name, record in fakes.items():
        monkeypatch.setitem(_REGISTRY, name, record)


def test_language_model_shapes_and_no_look_ahead() -> None:
    torch.manual_seed(0)
    model = LanguageModel(50, 32, 2, 4, mechanism="softmax", max_len=12).eval()
    tokens = torch.randint(50, (3, 12))
    logits = model(tokens)
    assert logits.shape == (3, 12, 50)
    changed = tokens.clone()
    changed[:, 7:] = torch.randint(50, (3, 5))
    again = model(changed)
    torch.testing.assert_close(again[:, :7], logits[:, :7])
    assert not torch.allclose(again[:, 7:], logits[:, 7:])


# without and with a short convolution in front of every mixer (two blocks, so the second mixer reads
# convolved inputs); the names that must have been built are the ones each form is known to take
@pytest.mark.parametrize(("depth", "short_conv", "expected"), [(1, 0, {"softmax"}),
                                                               (2, 4, {"softmax", "linear", "lightning"})])
def test_every_registered_causal_mixer_builds_a_language_model_that_does_not_look_ahead(
        depth: int, short_conv: int, expected: set[str]) -> None:
    built = []
    for record in attnlab.mechanisms():
        if mixer_refusal(record, causal=True) is not None:
            continue
        torch.manual_seed(0)
        try:
            model = LanguageModel(40, 16, depth, 2, mechanism=record.name, max_len=16, short_conv=short_conv).eval()
        except (ValueError, TypeError):
            continue  # the benchmark refuses these with the message; see test_quality_bench
        tokens = torch.randint(40, (2, 16))
        changed = tokens.clone()
        changed[:, 9:] = (changed[:, 9:] + 1) % 40
        with torch.no_grad():
            torch.testing.assert_close(model(changed)[:, :9], model(tokens)[:, :9], msg=record.name)
        built.append(record.name)
    assert expected <= set(built)


def test_models_refuse_mechanisms_that_do_not_fit(fake_mechanisms: None) -> None:
    with pytest.raises(MechanismMismatch, match="fake_bidirectional.*no causal form"):
        LanguageModel(10, 16, 1, 2, mechanism="fake_bidirectional", max_len=8)
    with pytest.raises(MechanismMismatch, match="fake_causal.*causal only.*bidirectional"):
        SequenceClassifier(3, 16, 1, 2, mechanism="fake_causal", max_len=8, vocab_size=10)
    with pytest.raises(MechanismMismatch, match="fake_causal.*causal only"):
        VisionTransformer(8, 2, 1, 10, dim=16, depth=1, heads=2, mechanism="fake_causal")
    with pytest.raises(MechanismMismatch, match="role 'cross'"):
        LanguageModel(10, 16, 1, 2, mechanism="fake_cross", max_len=8)
    with pytest.raises(KeyError, match="softmax"):
        LanguageModel(10, 16, 1, 2, mechanism="softmx", max_len=8)
    # a causal-only mechanism is fine in a causal encoder, a bidirectional-only one in an encoder
    SequenceClassifier(3, 16, 1, 2, mechanism="fake_causal", max_len=8, vocab_size=10, causal=True)
    SequenceClassifier(3, 16, 1, 2, mechanism="fake_bidirectional", max_len=8, vocab_size=10)


def test_everything_but_the_mixer_is_identical_across_mechanisms(fake_mechanisms: None) -> None:
    a = LanguageModel(30, 16, 2, 2, mechanism="softmax", max_len=8)
    b = LanguageModel(30, 16, 2, 2, mechanism="fake_recurrent", max_len=8)
    assert a.num_parameters == b.num_parameters == count_parameters(a)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    # embeddings + depth * (two norms + q/kv/out projections + MLP 16 -> 64 -> 16) + final norm + head; a head
    # tied to the token embedding is counted once
    block = 2 * (2 * 16) + (16 * 16 + 16 * 32 + 16 * 16) + (16 * 64 + 64) + (64 * 16 + 16)
    by_hand = 30 * 16 + 8 * 16 + 2 * block + 2 * 16 + 16 * 30
    assert a.num_parameters == by_hand
    tied = LanguageModel(30, 16, 2, 2, mechanism="softmax", max_len=8, tie_embeddings=True)
    assert tied.num_parameters == by_hand - 16 * 30


def test_language_model_initialisation_and_tied_read_out() -> None:
    torch.manual_seed(0)
    model = LanguageModel(4096, 64, 1, 4, max_len=64, init_std=0.02, tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    assert abs(float(model.embed.weight.detach().std()) - 0.02) < 1e-3
    assert abs(float(model.position.weight.detach().std()) - 0.02) < 2e-3
    default = LanguageModel(4096, 64, 1, 4, max_len=64)
    assert default.head.weight is not default.embed.weight
    assert abs(float(default.embed.weight.detach().std()) - 1.0) < 2e-2
    with pytest.raises(ValueError, match="init_std"):
        LanguageModel(10, 16, 1, 2, max_len=8, init_std=0.0)


def test_language_model_select_gives_the_logits_of_the_selected_positions() -> None:
    torch.manual_seed(0)
    model = LanguageModel(50, 32, 2, 4, max_len=12).eval()
    tokens = torch.randint(50, (3, 12))
    select = torch.rand(3, 12) < 0.3
    full = model(tokens)  # (B, N, vocab)
    torch.testing.assert_close(model(tokens, select=select), full[select], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="select"):
        model(tokens, select=select.long())
    with pytest.raises(ValueError, match="select"):
        model(tokens, select=select[:, :5])


def test_state_size_where_the_mechanism_defines_it(fake_mechanisms: None) -> None:
    assert LanguageModel(30, 32, 3, 4, mechanism="softmax", max_len=8).state_size is None
    model = LanguageModel(30, 32, 3, 4, mechanism="fake_recurrent", max_len=8)
    assert model.state_size == 3 * 4 * 8 * 8  # depth * heads * d_k * d_v with d = 32 / 4


def test_classifier_poolings_and_vision_transformer() -> None:
    torch.manual_seed(0)
    x = torch.randint(20, (4, 9))
    assert SequenceClassifier(5, 16, 1, 2, max_len=9, vocab_size=20)(x).shape == (4, 5)
    assert SequenceClassifier(5, 16, 1, 2, max_len=9, vocab_size=20, pooling="none")(x).shape == (4, 9, 5)
    regressor = SequenceClassifier(1, 12, 1, 2, max_len=9, input_dim=6, pooling="last", causal=True, mlp_ratio=0,
                                   norm=False, positions=False)
    features = torch.randn(4, 9, 6)
    out = regressor(features)
    changed = features.clone()
    changed[:, 3] += 1.0
    assert out.shape == (4, 1) and not torch.allclose(regressor(changed), out)  # the last token sees all
    vit = VisionTransformer(8, 2, 1, 10, dim=16, depth=1, heads=2)
    assert vit(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"images must have shape \[B, 1, 8, 8\], got \(3, 8, 8\)"):
        vit(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="patch_size=3 must divide image_size=8"):
        VisionTransformer(8, 3, 1, 10)
    with pytest.raises(ValueError, match="exactly one of vocab_size= and input_dim="):
        SequenceClassifier(2, 16, 1, 2, max_len=4)
    with pytest.raises(ValueError, match="longer than max_len=9"):
        SequenceClassifier(5, 16, 1, 2, max_len=9, vocab_size=20)(torch.randint(20, (1, 10)))


class _NeedsLength(nn.Module):
    def __init__(self, dim: int, heads: int, *, causal: bool = False, seq_len: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.mix = nn.Linear(seq_len, seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x.transpose(1, 2)).transpose(1, 2)


def test_a_required_sequence_length_option_is_filled_from_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    softmax = attnlab.get("softmax")
    record = dataclasses.replace(softmax, name="fake_needs_length", op=None, reference=None, layer=_NeedsLength,
                                 supports_causal=False, model_options=lambda seq_len: {"seq_len": seq_len})
    monkeypatch.setitem(_REGISTRY, "fake_needs_length", record)
    model = SequenceClassifier(2, 16, 1, 2, mechanism="fake_needs_length", max_len=7, vocab_size=10)
    assert model.trunk.blocks[0].mixer.seq_len == 7 and model.trunk.mixer_options == {"seq_len": 7}
    assert build_mixer("fake_needs_length", 16, 2, causal=False, seq_len=5).seq_len == 5


def test_required_window_options_scale_with_the_model_length() -> None:
    assert attnlab.get("sliding_window").options_for_model(64) == {"window": 16}
    assert attnlab.get("sliding_window").options_for_model(3) == {"window": 2}  # the key itself and one more
    assert attnlab.get("neighborhood").options_for_model(64) == {"kernel_size": 15}  # odd kernel
    assert attnlab.get("neighborhood").options_for_model(8) == {"kernel_size": 3}
    assert attnlab.get("neighborhood").options_for_model(2) == {"kernel_size": 1}  # never longer than the input
    assert attnlab.get("ninformer").options_for_model(13) == {"seq_len": 13}
    layer = build_mixer("sliding_window", 16, 2, causal=True, seq_len=64)
    assert layer.options == {"window": 16}
