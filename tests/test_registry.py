"""Registry, generic entry point and the generic layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnlab
from attnlab.ops import softmax_attention
from attnlab.registry import _REGISTRY, Mechanism


def test_records_are_frozen_and_complete() -> None:
    records = attnlab.mechanisms()
    assert "softmax" in [m.name for m in records]
    for m in records:
        for field in ("name", "op", "reference", "layer", "family", "paper", "arxiv", "supports_causal",
                      "supports_bidirectional", "complexity", "defaults"):
            assert hasattr(m, field)
        assert m.paper and m.complexity and m.family
        with pytest.raises(dataclasses.FrozenInstanceError):
            m.name = "x"  # type: ignore[misc]
        with pytest.raises(TypeError):
            m.defaults["new"] = 1  # type: ignore[index]


def test_unknown_name_lists_the_closest() -> None:
    with pytest.raises(KeyError, match="did you mean 'softmax'"):
        attnlab.get("sofmax")
    with pytest.raises(KeyError, match="registered: .*softmax"):
        attnlab.get("zzzzzz")


def test_attention_dispatches_to_the_op() -> None:
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    torch.testing.assert_close(attnlab.attention(q, k, v, causal=True), softmax_attention(q, k, v, causal=True))
    torch.testing.assert_close(attnlab.attention(q, k, v, mechanism="softmax", scale=0.5),
                               softmax_attention(q, k, v, scale=0.5))


def _toy(name: str, *, causal: bool, bidirectional: bool, layer=None) -> Mechanism:
    def op(q, k, v):  # an op without a causal parameter (like a causal-only recurrence)
        return v

    return Mechanism(name=name, op=op, reference=op, layer=layer, family="toy", paper="Toy", arxiv=None,
                     supports_causal=causal, supports_bidirectional=bidirectional, complexity="O(1)")


def test_unsupported_masking_regimes_raise_not_implemented() -> None:
    x = torch.randn(1, 1, 3, 2)
    causal_only = _toy("toy-causal", causal=True, bidirectional=False)
    assert causal_only(x, x, x, causal=True) is x
    with pytest.raises(NotImplementedError, match="causal only"):
        causal_only(x, x, x, causal=False)
    with pytest.raises(NotImplementedError, match="no causal form"):
        _toy("toy-bidir", causal=False, bidirectional=True)(x, x, x, causal=True)


def test_generic_layer_refuses_mechanisms_with_their_own_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    class ToyLayer(torch.nn.Module):
        pass

    monkeypatch.setitem(_REGISTRY, "toy-layer", _toy("toy-layer", causal=True, bidirectional=True, layer=ToyLayer))
    with pytest.raises(ValueError, match="attnlab.nn.ToyLayer"):
        attnlab.nn.Attention(16, 2, mechanism="toy-layer")


def test_generic_layer_self_cross_grouped_and_padding() -> None:
    torch.manual_seed(0)
    layer = attnlab.nn.Attention(32, 4, kv_heads=2, causal=False)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    assert layer(x).shape == (2, 5, 32)
    assert layer(x, context=ctx).shape == (2, 5, 32)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, 6:] = False
    padded = layer(x, context=ctx, key_padding_mask=padding)
    torch.testing.assert_close(padded[1], layer(x[1:], context=ctx[1:, :6])[0])
    with pytest.raises(ValueError, match="dim=32"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="kv_heads=3"):
        attnlab.nn.Attention(32, 4, kv_heads=3)
    with pytest.raises(TypeError, match="no option"):
        attnlab.nn.Attention(32, 4, window=3)
