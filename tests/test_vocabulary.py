"""The option vocabulary (the table at the top of docs/mechanisms.md), enforced on every registered signature.

Walks the op, the reference and the layer of every record in ``attnlab.mechanisms()``: one name per
concept (no synonym from :data:`SYNONYMS`), options keyword-only, ``causal`` a bool flag defaulting to
False (True for causal-only mechanisms, which refuse False), ``scale`` on every op whose scores are
scaled (``None`` = ``1/sqrt(D)`` unless the paper fixes another value), ``impl`` last with default
"auto", and the reference taking the op's options without ``impl``. A mechanism registered later is
checked with no new test code.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import attnlab
from attnlab.registry import Mechanism
from attnlab.testing import random_qkv, run_options

# name somebody might reach for -> the vocabulary's name for that concept
SYNONYMS = {
    "is_causal": "causal", "causal_mask": "causal", "bidirectional": "causal",
    "softmax_scale": "scale", "sm_scale": "scale", "scaling": "scale", "temperature": "scale",
    "sliding_window": "window", "window_size": "window (a causal local window) or k_budget (keys kept by selection)",
    "local_window": "window", "window_length": "window",
    "neighborhood_size": "kernel_size", "kernel": "kernel_size",
    "top_k": "k_budget", "topk": "k_budget", "num_selected": "k_budget", "keep": "k_budget",
    "num_sink_tokens": "sink_tokens", "sink_size": "sink_tokens", "num_sinks": "sink_tokens", "sinks": "sink_tokens",
    "chunk": "chunk_size", "chunk_len": "chunk_size", "chunk_length": "chunk_size", "BT": "chunk_size",
    "block_size": "chunk_size (HiP's two block sizes are block_size_q and block_size_k)",
    "initial_states": "initial_state", "init_state": "initial_state", "h0": "initial_state",
    "output_final_state": "return_state", "return_final_state": "return_state", "return_states": "return_state",
    "seq_length": "seq_len", "sequence_length": "seq_len", "length": "seq_len",
    "max_len": "max_length", "max_seq_len": "max_length", "max_seq_length": "max_length",
    "backend": "impl", "implementation": "impl", "kernel_impl": "impl",
    "num_heads": "heads", "n_heads": "heads", "n_head": "heads", "num_kv_heads": "kv_heads",
    "n_kv_heads": "kv_heads", "dropout_p": "dropout",
}
# ops whose paper scales the scores by a fixed value other than 1/sqrt(D): the default is that value
PAPER_SCALE = {"lightning": 1.0, "linear": 1.0}
# ops with no scale at all, and why (the vocabulary requires ``scale`` everywhere else)
NO_SCALE = {
    "flow": "Flowformer normalises by the incoming and outgoing flows of sigmoid feature maps; no q.k scale",
    "lightnet": "LightNet weighs the values by a softmax over the keys per channel (k are log-weights), "
                "read out linearly by q; no q.k product to scale",
}
QKV = ("q", "k", "v")

RECORDS = attnlab.mechanisms()
OPS = [m for m in RECORDS if m.op is not None]
LAYERS = [m for m in RECORDS if m.layer is not None]


def functions(record: Mechanism) -> list[tuple[str, Callable[..., Any]]]:
    found = []
    if record.op is not None:
        found.append(("op", record.op))
    if record.reference is not None:
        found.append(("reference", record.reference))
    if record.layer is not None:
        found.append(("layer", record.layer))
    return found


def parameters(function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)


@pytest.mark.parametrize("record", RECORDS, ids=lambda m: m.name)
def test_no_synonyms(record: Mechanism) -> None:
    for kind, function in functions(record):
        for name in parameters(function):
            assert name not in SYNONYMS, f"{record.name} {kind}: option {name!r} is spelled {SYNONYMS[name]!r} here"


@pytest.mark.parametrize("record", OPS, ids=lambda m: m.name)
def test_op_options_are_keyword_only(record: Mechanism) -> None:
    for kind, function in functions(record)[:2]:
        params = list(parameters(function).values())
        assert [p.name for p in params[:3]] == list(QKV), f"{record.name} {kind}: starts with q, k, v"
        for p in params[3:]:
            assert p.kind is p.KEYWORD_ONLY, f"{record.name} {kind}: option {p.name!r} must be keyword-only"


# a layer's positional parameters are the sizes of its inputs; everything after them is keyword-only
LAYER_SIZES = ("dim", "heads", "channels", "semantic_channels")


@pytest.mark.parametrize("record", LAYERS, ids=lambda m: m.name)
def test_layer_options_are_keyword_only(record: Mechanism) -> None:
    for p in parameters(record.layer).values():
        if p.kind is not p.KEYWORD_ONLY:
            assert p.name in LAYER_SIZES, f"{record.name} layer: option {p.name!r} must be keyword-only"


@pytest.mark.parametrize("record", OPS, ids=lambda m: m.name)
def test_op_takes_causal_with_the_vocabulary_default(record: Mechanism) -> None:
    for kind, function in functions(record)[:2]:
        causal = parameters(function).get("causal")
        assert causal is not None, f"{record.name} {kind} takes no causal= (every op does)"
        assert causal.default is record.causal_only, (
            f"{record.name} {kind}: causal defaults to {causal.default!r}; the default is False where an op has "
            f"both modes (SDPA's is_causal) and True for a causal-only op")
        assert "bool" in str(causal.annotation), f"{record.name} {kind}: causal is annotated {causal.annotation!r}"


def small_inputs(record: Mechanism) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    q, k, v = random_qkv(record, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = run_options(record, causal=record.supports_causal)
    return q, k, v, options


@pytest.mark.parametrize("record", OPS, ids=lambda m: m.name)
def test_op_refuses_what_it_does_not_define_and_non_bool_causal(record: Mechanism) -> None:
    q, k, v, options = small_inputs(record)
    for _, function in functions(record)[:2]:
        if record.causal_only:
            with pytest.raises(NotImplementedError, match="causal"):
                function(q, k, v, **{**options, "causal": False})
        if not record.supports_causal:
            with pytest.raises(NotImplementedError, match="causal"):
                function(q, k, v, **{**options, "causal": True})
        with pytest.raises(TypeError, match="causal"):
            function(q, k, v, **{**options, "causal": 1})
        with pytest.raises(TypeError, match="causal"):
            function(q, k, v, **{**options, "causal": "yes"})


@pytest.mark.parametrize("record", OPS, ids=lambda m: m.name)
def test_op_takes_scale_with_the_vocabulary_default(record: Mechanism) -> None:
    for kind, function in functions(record)[:2]:
        scale = parameters(function).get("scale")
        if record.name in NO_SCALE:
            assert scale is None, f"{record.name} takes scale=; remove it from NO_SCALE"
            continue
        assert scale is not None, f"{record.name} {kind} takes no scale= (or say why in NO_SCALE)"
        assert scale.default == PAPER_SCALE.get(record.name), f"{record.name} {kind}: scale={scale.default!r}"


@pytest.mark.parametrize("record", [m for m in OPS if m.reference is not None], ids=lambda m: m.name)
def test_reference_takes_the_options_of_the_op(record: Mechanism) -> None:
    op = {n: p.default for n, p in parameters(record.op).items() if n != "impl"}
    reference = {n: p.default for n, p in parameters(record.reference).items()}
    assert op.keys() == reference.keys(), f"{record.name}: op {sorted(op)} vs reference {sorted(reference)}"
    differ = [n for n in op if op[n] is not reference[n] and op[n] != reference[n]]
    assert not differ, f"{record.name}: op and reference defaults differ for {differ}"


@pytest.mark.parametrize("record", RECORDS, ids=lambda m: m.name)
def test_impl_is_last_with_default_auto(record: Mechanism) -> None:
    for kind, function in functions(record):
        params = list(parameters(function).values())
        names = [p.name for p in params]
        if "impl" not in names:
            # the registry reads the impls from the op (the layer of a layer-only record)
            declares = kind == "op" or (kind == "layer" and record.op is None)
            assert not (declares and record.impls), f"{record.name} {kind}: impls without an impl= option"
            continue
        assert kind != "reference", f"{record.name}: the reference is one implementation; it takes no impl="
        impl = params[-1]
        assert impl.name == "impl", f"{record.name} {kind}: impl must be the last option, got {names}"
        assert impl.default == "auto" and impl.kind is impl.KEYWORD_ONLY
        assert re.fullmatch(r"Literal\['auto', 'reference'(, '\w+')*\]", str(impl.annotation)), impl.annotation


@pytest.mark.parametrize("record", LAYERS, ids=lambda m: m.name)
def test_layer_causal_flag(record: Mechanism) -> None:
    """Mixers are built as ``layer(dim, heads, causal=...)``; a layer taking causal uses the op's default rule."""
    causal = parameters(record.layer).get("causal")
    if record.role == "mixer" or record.supports_causal:
        assert causal is not None, f"{record.name}: the layer takes no causal="
    if causal is None:
        return
    assert causal.kind is causal.KEYWORD_ONLY
    assert causal.default is record.causal_only, f"{record.name}: layer causal defaults to {causal.default!r}"


@pytest.mark.parametrize("record", [m for m in LAYERS if "causal" in parameters(m.layer)], ids=lambda m: m.name)
def test_layer_refuses_the_mode_it_does_not_define_and_non_bool_causal(record: Mechanism) -> None:
    c = record.check
    options = {**record.options_for_model(c.length), **c.layer_configs[0]}
    dim = c.heads * c.head_dim
    for causal, supported in ((True, record.supports_causal), (False, record.supports_bidirectional)):
        if not supported:
            with pytest.raises((NotImplementedError, ValueError), match="causal"):
                record.layer(dim, c.heads, causal=causal, **options)
        with pytest.raises(TypeError, match="causal"):
            record.layer(dim, c.heads, causal=int(causal), **options)


def test_the_docs_table_lists_every_vocabulary_name() -> None:
    """docs/mechanisms.md opens with the vocabulary table; every name this test enforces is in it."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "mechanisms.md").read_text()
    table = text[: text.index("\n## ", text.index("| name"))]
    for name in ("causal", "scale", "window", "kernel_size", "k_budget", "sink_tokens", "chunk_size",
                 "initial_state", "return_state", "impl", "seq_len", "max_length", "heads", "kv_heads"):
        assert f"`{name}`" in table, f"docs/mechanisms.md vocabulary table lacks `{name}`"
    for synonym in ("is_causal", "softmax_scale", "output_final_state", "window_size"):
        assert synonym in table, f"the table should name the field's spelling {synonym!r} it replaces"


def test_attnlab_list_shows_each_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    from attnlab.cli import main, options_text

    hip = options_text(attnlab.get("hip"))
    assert "k_budget=512" in hip and "window=128" in hip and "sink_tokens=4" in hip and "causal=True" in hip
    assert options_text(attnlab.get("sliding_window")).startswith("window=?")  # required, no default
    assert "impl='auto' (reference|chunked|recurrent|triton)" in options_text(attnlab.get("lightning"))
    assert "seq_len=?" in options_text(attnlab.get("ninformer"))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "options" in out and "k_budget=512" in out.replace("\n", " ").replace("│", "")
