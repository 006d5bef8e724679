"""Property-based fuzzing of every registered op and layer (hypothesis).

Each draw picks sizes (B <= 2, N <= 64, D <= 32), a dtype (float32, float64, bfloat16), an impl that
runs on the CPU, and options: valid ones, or one option replaced by an invalid value (zero, negative,
huge, a wrong type, None, NaN); sometimes a NaN/Inf at one key of k or v. The op must then either

- return the reference's result (within the conformance tolerance of its dtype), finite for finite
  inputs; with a non-finite key: every row NaN or equal to the reference on the input with that key
  zeroed, at least one row NaN, and (causal) no NaN before the key; or
- raise ``ValueError``/``TypeError`` whose message names the argument at fault (the one drawn
  invalid, else one of the op's arguments); ``NotImplementedError`` only for a masking regime the
  mechanism does not define.

Never another exception, never a hang (sizes are bounded; hypothesis' ``deadline`` is set).
``make test`` runs the "default" profile (over 2,000 op draws); ``HYPOTHESIS_PROFILE=fuzz`` runs 20
times as many. The draw and refusal counts are printed in the terminal summary (``tests/conftest.py``).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.registry import Mechanism
from attnlab.testing import first_output, relative_error

OPS = [m for m in attnlab.mechanisms() if m.op is not None and m.reference is not None]
LAYERS = [m for m in attnlab.mechanisms() if m.layer is not None]
OP_DRAWS = 2000
EXAMPLES = math.ceil(OP_DRAWS * 1.1 / len(OPS))  # per op: a margin over 2,000 in all

settings.register_profile("default", max_examples=EXAMPLES, deadline=60_000, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("fuzz", parent=settings.get_profile("default"), max_examples=20 * EXAMPLES,
                          derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

COUNTS: Counter[str] = Counter()
"""Draws and outcomes, printed by ``tests/conftest.py`` at the end of the run."""

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
INVALID = (0, -1, -7, 10**5, 2.5, float("nan"), float("inf"), "yes", None, True, (1, 2, 3))
LAYER_VALUES = (0, -1, 10**4, 2.5, float("nan"), "yes", True, (1, 2, 3))
SLOW_IMPLS = ("flex", "triton")  # compiled on first use per shape: seconds per draw on CPU


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny calls: one intra-op thread is several times faster than a pool fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tolerance(record: Mechanism, dtype: torch.dtype) -> float:
    c = record.check
    return {torch.float64: c.float64_tolerance, torch.float32: c.float32_tolerance}.get(dtype, c.bf16_tolerance)


def tensor_options(record: Mechanism, *, B: int, H: int, Hkv: int, N: int, M: int, dtype: torch.dtype,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The tensor-valued options of ``record`` at this size (factors exact in ``dtype``)."""
    options = {}
    for name, value in record.check.options.items():
        if not isinstance(value, torch.Tensor):
            continue
        if name == "q_bias":
            shape = (1, 1, N, value.shape[-1])
        elif name == "k_bias":
            shape = (1, 1, M, value.shape[-1])
        elif name == "key_bias":
            shape = (B, Hkv, M)
        else:
            raise AssertionError(f"{record.name}: no fuzz size rule for tensor option {name!r}")
        options[name] = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return options


def valid_options(record: Mechanism, N: int) -> dict[str, Any]:
    """The record's check options (non-tensor), resized where they depend on N."""
    options = {k: v for k, v in record.check.options.items() if not isinstance(v, torch.Tensor)}
    for name in ("kernel_size", "window"):
        if name in options:
            options[name] = max(2, min(options[name], N)) if name == "kernel_size" else options[name]
    if "num_agents" in options:
        options["num_agents"] = min(options["num_agents"], N)
    return options


def scalar_option_names(record: Mechanism) -> list[str]:
    names = list(record.defaults) + list(record.required_options)
    return [n for n in names if n not in ("impl", "initial_state", "causal")
            and not isinstance(record.check.options.get(n), torch.Tensor)
            and not isinstance(record.defaults.get(n, 0), torch.Tensor)]


def names_an_argument(message: str, names: list[str]) -> bool:
    return any(name in message for name in names)


@st.composite
def op_draws(draw: st.DrawFn, record: Mechanism) -> dict[str, Any]:
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * (draw(st.integers(1, 2)) if record.supports_gqa else 1)
    N = draw(st.integers(1, 64))
    M = draw(st.integers(max(N, 1), 64)) if record.supports_cross and draw(st.booleans()) else N
    D = draw(st.integers(1, 32))
    modes = [c for c in (False, True) if (record.supports_causal if c else record.supports_bidirectional)]
    causal: Any = draw(st.sampled_from(modes))
    impls = ["auto", "reference", *(i for i in record.impls_on("cpu") if i not in SLOW_IMPLS)]
    if not causal:
        impls = [i for i in impls if i not in record.causal_only_impls]
    impl = draw(st.sampled_from(impls)) if record.accepts("impl") else None
    options = valid_options(record, N)
    invalid = None
    kind = draw(st.sampled_from(["valid"] * 5 + ["option", "causal", "nonfinite", "nonfinite"]))
    names = scalar_option_names(record)
    if kind == "option" and names:
        invalid = draw(st.sampled_from(names))
        options[invalid] = draw(st.sampled_from(INVALID))
    elif kind == "causal":
        invalid = "causal"
        causal = draw(st.sampled_from(["yes", None, 1, 0.0]))
    where = None
    if kind == "nonfinite":
        where = (draw(st.sampled_from("kv")), draw(st.integers(0, M - 1)),
                 draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])))
    return {"dtype": dtype, "B": B, "H": H, "Hkv": Hkv, "N": N, "M": M, "D": D, "causal": causal, "impl": impl,
            "options": options, "invalid": invalid, "nonfinite": where, "seed": draw(st.integers(0, 2**16))}


def run_op_draw(record: Mechanism, case: dict[str, Any]) -> None:
    dtype, B, H, Hkv, N, M, D = (case[k] for k in ("dtype", "B", "H", "Hkv", "N", "M", "D"))
    generator = torch.Generator().manual_seed(case["seed"])
    q, k, v = (torch.randn(B, h, n, D, generator=generator, dtype=torch.float64).to(dtype)
               for h, n in ((H, N), (Hkv, M), (Hkv, M)))
    options = {**case["options"], **tensor_options(record, B=B, H=H, Hkv=Hkv, N=N, M=M, dtype=dtype,
                                                    generator=generator)}
    clean_k, clean_v = k, v
    if case["nonfinite"] is not None:
        which, t, value = case["nonfinite"]
        k, v = k.clone(), v.clone()
        (k if which == "k" else v)[:, -1, t, 0] = value
        clean_k, clean_v = k.masked_fill(~torch.isfinite(k), 0), v.masked_fill(~torch.isfinite(v), 0)
        bad_rows = ~torch.isfinite(k).all(-1) | ~torch.isfinite(v).all(-1)
        clean_k = torch.where(bad_rows[..., None], 0, clean_k)
        clean_v = torch.where(bad_rows[..., None], 0, clean_v)
    call = dict(options, **({"impl": case["impl"]} if case["impl"] is not None else {}))
    COUNTS["op draws"] += 1
    try:
        out = first_output(record(q, k, v, causal=case["causal"], **call))
    except (ValueError, TypeError) as error:
        COUNTS["op refusals"] += 1
        names = [case["invalid"]] if case["invalid"] else (
            [*scalar_option_names(record), *options, "q", "k", "v", "N", "M", "H", "D", "shape", "length"])
        assert names_an_argument(str(error), names), f"{record.name} {case}: {type(error).__name__}: {error}"
        return
    except NotImplementedError as error:
        COUNTS["op refusals"] += 1
        assert case["causal"] in (True, False) and case["invalid"] is None, f"{record.name} {case}: {error!r}"
        assert "causal" in str(error), f"{record.name} {case}: {error!r}"
        return
    COUNTS["op results"] += 1
    # accepted: an invalid draw must still be a meaningful call (then it equals the reference too)
    assert out.dtype == dtype and out.shape == (B, H, N, v.shape[-1]), f"{record.name} {case}"
    reference_options = {name: (x.double() if isinstance(x, torch.Tensor) else x) for name, x in options.items()}
    expected = first_output(record.run_reference(q.double(), clean_k.double(), clean_v.double(),
                                                 causal=case["causal"], **reference_options))
    if case["nonfinite"] is None:
        assert torch.isfinite(out).all(), f"{record.name} {case}: non-finite output for finite input"
        error = relative_error(out, expected)
        assert error <= tolerance(record, dtype), f"{record.name} {case}: rel. error {error:.2e}"
        return
    nan_rows = torch.isnan(out).all(dim=-1)  # (B, H, N)
    assert nan_rows.any(), f"{record.name} {case}: no row saw the non-finite key"
    partly = torch.isnan(out).any(dim=-1) & ~nan_rows
    assert not partly.any(), f"{record.name} {case}: rows partly NaN"
    if case["causal"] is True:
        t = case["nonfinite"][1] - (M - N)
        assert not nan_rows[..., : max(t, 0)].any(), f"{record.name} {case}: NaN before the non-finite key"
    finite = ~nan_rows
    if finite.any():
        error = relative_error(out[finite], expected[finite])
        assert error <= tolerance(record, dtype), f"{record.name} {case}: clean rows rel. error {error:.2e}"


@pytest.mark.fuzz
@pytest.mark.parametrize("record", OPS, ids=lambda m: m.name)
def test_fuzz_op(record: Mechanism) -> None:
    @given(case=op_draws(record))
    def check(case: dict[str, Any]) -> None:
        run_op_draw(record, case)

    check()


# ----------------------------------------------------------------------------------------------------
# layers: sizes, dtypes, causal flags, bool options and non-finite tokens


@st.composite
def layer_draws(draw: st.DrawFn, record: Mechanism) -> dict[str, Any]:
    modes = [c for c in (False, True) if (record.supports_causal if c else record.supports_bidirectional)]
    config = dict(draw(st.sampled_from(record.check.layer_configs)))
    causal: Any = draw(st.sampled_from(modes))
    kind = draw(st.sampled_from(["valid"] * 3 + ["causal", "bool", "option", "option", "nonfinite", "nonfinite"]))
    invalid = None
    bools = [n for n, d in record.defaults.items() if isinstance(d, bool) and n != "causal"]
    numbers = [n for n, d in record.defaults.items()
               if n != "causal" and not isinstance(d, bool) and (d is None or isinstance(d, int | float))]
    if kind == "causal" and "causal" in record.defaults:
        invalid, causal = "causal", draw(st.sampled_from(["yes", None, 1]))
    elif kind == "bool" and bools:
        invalid = draw(st.sampled_from(bools))
        config[invalid] = draw(st.sampled_from(["yes", None, 1, 0.0]))
    elif kind == "option" and numbers:
        # a number option with a value that is wrong for it, or legal and extreme (then it must still run)
        name = draw(st.sampled_from(numbers))
        config[name] = draw(st.sampled_from([x for x in LAYER_VALUES if name != "grid" or not isinstance(x, tuple)]))
        invalid = name
    nonfinite = (draw(st.integers(0, record.check.length - 1)), draw(st.sampled_from([float("nan"), float("inf")]))
                 ) if kind == "nonfinite" else None
    return {"config": config, "causal": causal, "invalid": invalid, "nonfinite": nonfinite,
            "dtype": draw(st.sampled_from(DTYPES)), "batch": draw(st.integers(1, 2)), "seed": draw(st.integers(0, 99))}


def run_layer_draw(record: Mechanism, case: dict[str, Any]) -> None:
    c = record.check
    dim, heads = c.heads * c.head_dim, c.heads
    COUNTS["layer draws"] += 1
    torch.manual_seed(case["seed"])
    try:
        if c.layer_build is not None:
            layer = c.layer_build(dim, heads, causal=case["causal"], **case["config"])
        else:
            layer = record.layer(dim, heads, causal=case["causal"], **case["config"])
    except (ValueError, TypeError) as error:
        COUNTS["layer refusals"] += 1
        assert case["invalid"] and case["invalid"] in str(error), f"{record.name} {case}: {error!r}"
        return
    value = case["config"].get(case["invalid"])
    wrong_type = case["invalid"] == "causal" or isinstance(value, str | bool | tuple) or (
        isinstance(value, float) and not math.isfinite(value))
    assert not wrong_type, f"{record.name} {case}: accepted {case['invalid']}={value!r}"
    layer = layer.to(case["dtype"]).eval()
    generator = torch.Generator().manual_seed(case["seed"])
    if c.layer_inputs is not None:
        inputs, shape = c.layer_inputs(layer, batch=case["batch"], length=c.length, dim=dim, dtype=case["dtype"],
                                       generator=generator)
    else:
        x = torch.randn(case["batch"], c.length, dim, generator=generator, dtype=torch.float64).to(case["dtype"])
        inputs, shape = {"x": x}, tuple(x.shape)
    inputs = dict(inputs)
    with torch.no_grad():
        clean = first_output(layer(**inputs))
        assert clean.shape == tuple(shape) and clean.dtype == case["dtype"] and torch.isfinite(clean).all(), \
            f"{record.name} {case}"
        if case["nonfinite"] is None or record.role != "mixer" or getattr(layer, "causal", False) is not True:
            return  # the promise on non-finite tokens is the causal one (bidirectional rows may all see them)
        t, value = case["nonfinite"]
        name = next(iter(inputs))
        x = inputs[name].clone()
        x[:, t, 0] = value
        out = first_output(layer(**{**inputs, name: x}))
    assert torch.isnan(out[:, t]).all(), f"{record.name} {case}: the row of the non-finite token is not NaN"
    # earlier rows: the clean output, up to rounding (a key set gathered per block of queries may be ordered
    # differently once the token is zeroed; the conformance suite checks float64 at 1e-12)
    torch.testing.assert_close(out[:, :t], clean[:, :t])


@pytest.mark.fuzz
@pytest.mark.parametrize("record", LAYERS, ids=lambda m: m.name)
def test_fuzz_layer(record: Mechanism) -> None:
    @settings(max_examples=max(10, EXAMPLES // 8))
    @given(case=layer_draws(record))
    def check(case: dict[str, Any]) -> None:
        run_layer_draw(record, case)

    check()


def test_fuzz_runs_enough_op_draws() -> None:
    """The profile of ``make test`` draws at least 2,000 op calls in all."""
    assert settings.default.max_examples * len(OPS) >= OP_DRAWS
