"""Registry, generic entry point and the generic layer."""

from __future__ import annotations

import dataclasses
from typing import Literal

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


def _op_with_options(q, k, v, *, window: int, causal: bool = False, scale: float | None = None,
                     impl: Literal["auto", "reference", "fast", "kernel"] = "auto"):
    return v


def _record(**fields) -> Mechanism:
    base = dict(name="toy-options", op=_op_with_options, reference=None, layer=None, family="toy", paper="Toy",
                arxiv=None, supports_causal=True, supports_bidirectional=True, complexity="O(1)")
    return Mechanism(**{**base, **fields})


def test_defaults_required_options_and_impls_come_from_the_signature() -> None:
    record = _record(impl_devices={"kernel": ("cuda", "triton-interpreter")})
    assert dict(record.defaults) == {"causal": False, "scale": None, "impl": "auto"}
    assert record.required_options == ("window",)
    assert record.impls == ("fast", "kernel")
    assert record.impls_on("cpu") == ("fast",) and record.impls_on("cuda") == ("fast", "kernel")
    assert record.impl_runs_on("kernel", "triton-interpreter") and record.impl_runs_on("auto", "cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        record.impl_runs_on("fast", "tpu")
    with pytest.raises(TypeError):
        _record(defaults={"window": 3})  # read from the signature, never written by hand


def test_registration_refuses_impl_declarations_that_do_not_match_the_op() -> None:
    with pytest.raises(ValueError, match="'gather'"):
        _record(impl_devices={"gather": ("cuda",)})
    with pytest.raises(ValueError, match="devices are"):
        _record(impl_devices={"kernel": ("gpu",)})
    with pytest.raises(ValueError, match="causal_only_impls"):
        _record(causal_only_impls=("gather",))

    def untyped(q, k, v, *, impl: str = "auto"):
        return v

    with pytest.raises(TypeError, match="Literal"):
        _record(op=untyped)


def test_model_and_bench_hooks() -> None:
    from attnlab.registry import BenchShape

    record = _record(model_options=lambda seq_len: {"window": seq_len // 4},
                     bench_options=lambda shape: {"window": min(128, shape.length)})
    assert record.options_for_model(64) == {"window": 16}
    with pytest.raises(ValueError, match="seq_len"):
        record.options_for_model(None)
    shape = BenchShape(batch=1, heads=2, kv_heads=1, length=4096, head_dim=8, device="cpu", dtype=torch.float32)
    assert shape.device == torch.device("cpu")
    assert record.options_for_bench(shape) == {"window": 128}
    assert _record().options_for_model(64) == {} and _record().options_for_bench(shape) == {}
