"""Layer-level conformance: every registered layer (``Mechanism(layer=...)``) is held to the same checks.

Parametrized over ``attnlab.mechanisms()`` records that have a ``layer``, once per option set in
``record.check.layer_configs``: a layer registered later is checked here with no new test code.

How a layer is built and fed (see ``attnlab.CheckConfig``):

- role "mixer": ``layer = record.layer(dim, heads, causal=causal, **config)`` with
  ``dim = check.heads * check.head_dim`` and input ``x [B, N, dim]`` (``N = check.length``); the output
  must have the shape of ``x``.
- any role may set ``check.layer_inputs(layer, *, batch, length, dim, dtype, generator)`` returning
  ``(inputs, output_shape)``: ``inputs`` a dict of keyword arguments (first entry: the main
  ``[B, N, dim]`` sequence, batch first), ``output_shape`` the expected shape of the first output.
- roles "cross", "pooling", "probe" whose constructor is not ``layer(dim, heads, causal=...)`` set
  ``check.layer_build(dim, heads, *, causal, **config)``.

Checks: output shape and dtype (float32, float64, bfloat16), no look-ahead for causal mixers (every
floating input perturbed after position t), batch independence, a gradient reaching every trainable
parameter (accumulated over three random batches in training mode, so routed experts get picked),
deterministic eval mode, and bad inputs (an extra dimension, an integer dtype, a wrong feature size)
raising ``ValueError``/``TypeError`` whose message names the argument. A layer output may be a tensor
or a tuple whose first entry is the output.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import attnlab
from attnlab.registry import Mechanism
from attnlab.testing import first_output

LAYERS = [m for m in attnlab.mechanisms() if m.layer is not None]


def modes(record: Mechanism) -> list[bool]:
    return [c for c in (False, True) if (record.supports_causal if c else record.supports_bidirectional)]


def config_id(record: Mechanism, config: dict[str, Any]) -> str:
    options = ",".join(f"{key}={value}" for key, value in config.items())
    return f"{record.name}[{options}]" if options else record.name


def layer_cases(*, causal_only: bool = False) -> list:
    cases = []
    for record in LAYERS:
        for config in record.check.layer_configs:
            for causal in modes(record):
                if causal_only and not causal:
                    continue
                label = f"{config_id(record, dict(config))}-{'causal' if causal else 'bidir'}"
                cases.append(pytest.param(record, dict(config), causal, id=label))
    return cases


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(record: Mechanism, config: dict[str, Any], *, causal: bool, dtype: torch.dtype,
          seed: int = 0) -> torch.nn.Module:
    c = record.check
    dim = c.heads * c.head_dim
    torch.manual_seed(seed)
    if c.layer_build is not None:
        layer = c.layer_build(dim, c.heads, causal=causal, **config)
    else:
        layer = record.layer(dim, c.heads, causal=causal, **config)
    return layer.to(dtype)


def make_inputs(record: Mechanism, layer: torch.nn.Module, *, batch: int, dtype: torch.dtype,
                seed: int) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    c = record.check
    dim, length = c.heads * c.head_dim, c.length
    generator = seeded(seed)
    if c.layer_inputs is not None:
        inputs, shape = c.layer_inputs(layer, batch=batch, length=length, dim=dim, dtype=dtype, generator=generator)
        return dict(inputs), tuple(shape)
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    return {"x": x}, tuple(x.shape)


def run(layer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return first_output(layer(**inputs))


def select(inputs: dict[str, torch.Tensor], rows: slice | list[int]) -> dict[str, torch.Tensor]:
    return {name: x[rows] if isinstance(x, torch.Tensor) else x for name, x in inputs.items()}


def test_the_suite_covers_layers() -> None:
    """The registry has layers to check, and mixers follow the ``layer(dim, heads, causal=...)`` rule."""
    assert LAYERS, "no registered mechanism has a layer"
    for record in LAYERS:
        if record.role == "mixer":
            assert record.check.layer_build is None, f"{record.name}: a mixer is built as layer(dim, heads, ...)"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("record,config,causal", layer_cases())
def test_output_shape_and_dtype(record: Mechanism, config: dict, causal: bool, dtype: torch.dtype) -> None:
    layer = build(record, config, causal=causal, dtype=dtype).eval()
    inputs, shape = make_inputs(record, layer, batch=2, dtype=dtype, seed=1)
    with torch.no_grad():
        out = run(layer, inputs)
    assert out.dtype == dtype, f"{record.name} returned {out.dtype} for {dtype} inputs"
    assert tuple(out.shape) == shape, f"{record.name}: output shape {tuple(out.shape)}, expected {shape}"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("record,config,causal", [p for p in layer_cases(causal_only=True)
                                                   if p.values[0].role == "mixer"])
def test_causal_layer_does_not_look_ahead(record: Mechanism, config: dict, causal: bool) -> None:
    layer = build(record, config, causal=True, dtype=torch.float64).eval()
    inputs, _ = make_inputs(record, layer, batch=2, dtype=torch.float64, seed=2)
    N = record.check.length
    with torch.no_grad():
        out = run(layer, inputs)
        for t in (0, N // 2, N - 2):
            changed = dict(inputs)
            for name, x in inputs.items():
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 2 and x.shape[1] == N:
                    x = x.clone()
                    x[:, t + 1:] += torch.randn(x[:, t + 1:].shape, generator=seeded(t), dtype=x.dtype) * 3
                    changed[name] = x
            out2 = run(layer, changed)
            torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], rtol=1e-9, atol=1e-9,
                                       msg=lambda m, t=t: f"{record.name}: outputs up to t={t} changed: {m}")
            assert not torch.allclose(out2[:, t + 1:], out[:, t + 1:]), "perturbation had no effect at all"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("record,config,causal", [p for p in layer_cases(causal_only=True)
                                                   if p.values[0].role == "mixer"])
def test_causal_layer_nonfinite_token_does_not_reach_earlier_rows(record: Mechanism, config: dict, causal: bool,
                                                                  bad: float) -> None:
    """A NaN/Inf in the input at token t leaves the outputs before t exactly as they were; row t is NaN."""
    layer = build(record, config, causal=True, dtype=torch.float64).eval()
    inputs, _ = make_inputs(record, layer, batch=2, dtype=torch.float64, seed=3)
    N = record.check.length
    name = next(iter(inputs))
    with torch.no_grad():
        clean = run(layer, inputs)
        for t in (1, N // 2, N - 1):
            x = inputs[name].clone()
            x[:, t, 0] = bad
            out = run(layer, {**inputs, name: x})
            torch.testing.assert_close(out[:, :t], clean[:, :t], rtol=1e-12, atol=1e-12,
                                       msg=lambda m, t=t: f"{record.name}: rows before t={t} changed: {m}")
            assert torch.isnan(out[:, t]).all(), f"{record.name}: row {t} saw {bad} but is not NaN"


@pytest.mark.parametrize("record,config,causal", layer_cases())
def test_layer_batch_elements_are_independent(record: Mechanism, config: dict, causal: bool) -> None:
    layer = build(record, config, causal=causal, dtype=torch.float64).eval()
    inputs, _ = make_inputs(record, layer, batch=3, dtype=torch.float64, seed=3)
    with torch.no_grad():
        out = run(layer, inputs)
        for b in range(3):
            alone = run(layer, select(inputs, slice(b, b + 1)))
            torch.testing.assert_close(alone, out[b:b + 1], rtol=1e-9, atol=1e-9)
        other, _ = make_inputs(record, layer, batch=3, dtype=torch.float64, seed=4)
        mixed = {name: torch.cat([x[:1], other[name][1:2], x[2:]]) if isinstance(x, torch.Tensor) else x
                 for name, x in inputs.items()}
        out2 = run(layer, mixed)
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(out2[1], out[1]), f"{record.name}: the output ignores its input"


@pytest.mark.parametrize("record,config,causal", layer_cases())
def test_gradients_reach_every_parameter(record: Mechanism, config: dict, causal: bool) -> None:
    layer = build(record, config, causal=causal, dtype=torch.float64).train()
    parameters = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    assert parameters, f"{record.name} has no trainable parameter"
    for seed in (5, 6, 7):
        inputs, _ = make_inputs(record, layer, batch=3, dtype=torch.float64, seed=seed)
        out = run(layer, inputs)
        weights = torch.randn(out.shape, generator=seeded(seed + 100), dtype=out.dtype)
        (out * weights).sum().backward()
    missing = [name for name, p in parameters.items() if p.grad is None or not (p.grad.abs().sum() > 0)]
    assert not missing, f"{record.name}: no gradient reached {', '.join(missing)}"


@pytest.mark.parametrize("record,config,causal", layer_cases())
def test_eval_mode_is_deterministic(record: Mechanism, config: dict, causal: bool) -> None:
    layer = build(record, config, causal=causal, dtype=torch.float32)
    inputs, _ = make_inputs(record, layer, batch=2, dtype=torch.float32, seed=8)
    layer.train()
    with torch.no_grad():
        run(layer, inputs)  # a training step may update statistics (usage counts); eval must not depend on luck
    layer.eval()
    with torch.no_grad():
        first, second = run(layer, inputs), run(layer, inputs)
    assert torch.equal(first, second), f"{record.name}: two eval-mode forwards differ"


def bad_inputs(inputs: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor, type[Exception]]]:
    """(argument, label, bad value, expected error) for every tensor input."""
    cases = []
    for name, x in inputs.items():
        if not isinstance(x, torch.Tensor):
            continue
        cases.append((name, "extra dimension", x[None], ValueError))
        if x.is_floating_point():
            cases.append((name, "integer dtype", x.round().to(torch.int64), TypeError))
            if x.ndim == 3:
                cases.append((name, "feature size", x[..., :-1], ValueError))
    return cases


@pytest.mark.parametrize("record", LAYERS, ids=lambda m: m.name)
def test_layer_bad_input_raises_with_a_clear_message(record: Mechanism) -> None:
    config = dict(record.check.layer_configs[0])
    layer = build(record, config, causal=modes(record)[0], dtype=torch.float32).eval()
    inputs, _ = make_inputs(record, layer, batch=2, dtype=torch.float32, seed=9)
    for name, label, value, error in bad_inputs(inputs):
        with pytest.raises((ValueError, TypeError)) as info:
            run(layer, {**inputs, name: value})
        message = str(info.value)
        assert isinstance(info.value, error), f"{record.name} / {name} {label}: raised {info.value!r}"
        assert re.search(rf"\b{re.escape(name)}\b", message), f"{record.name} / {name} {label}: {message!r}"


@pytest.mark.parametrize("record", LAYERS, ids=lambda m: m.name)
def test_layer_flags_are_bools(record: Mechanism) -> None:
    """``causal`` and every bool option refuse "yes", None and 1 with a TypeError naming the option."""
    config = dict(record.check.layer_configs[0])
    flags = [n for n, d in record.defaults.items() if isinstance(d, bool)]
    for name in flags:
        for value in ("yes", None, 1):
            causal = value if name == "causal" else modes(record)[0]
            options = {key: val for key, val in config.items() if key != name}
            if name != "causal":
                options[name] = value
            with pytest.raises(TypeError, match=rf"\b{name}\b"):
                build(record, options, causal=causal, dtype=torch.float32)


@pytest.mark.parametrize("record", LAYERS, ids=lambda m: m.name)
def test_layer_number_options_are_checked(record: Mechanism) -> None:
    """Number options refuse a string (TypeError), an int option a float, a float option NaN (ValueError),
    each naming the option (they used to surface as torch allocation errors, or be accepted)."""
    config = dict(record.check.layer_configs[0])
    causal = modes(record)[0]
    for name, default in record.defaults.items():
        if name in ("causal", "grid") or isinstance(default, bool | str | tuple):
            continue
        # a None default may stand for a choice of strings (shrp's router): then "yes" is a ValueError
        wrong: list[tuple[object, Any]] = [("yes", TypeError if default is not None else (TypeError, ValueError))]
        if isinstance(default, int):
            wrong.append((2.5, TypeError))
        if isinstance(default, float):
            wrong.append((float("nan"), ValueError))
        for value, error in wrong:
            with pytest.raises(error, match=rf"\b{name}\b"):
                build(record, {**config, name: value}, causal=causal, dtype=torch.float32)
