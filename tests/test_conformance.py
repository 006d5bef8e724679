"""Conformance suite: every registered functional op is held to the same checks.

Parametrized over ``attnlab.mechanisms()``: a mechanism registered later is checked here with no new
test code. Sizes and tolerances come from each record's ``check`` (``attnlab.CheckConfig``).

Every impl a record declares (the ``Literal`` of its op's ``impl`` parameter) is compared with the
reference where it can run here: impls that run on the CPU in this process; impls that run under the
Triton interpreter (``impl_devices``: "triton-interpreter") in ONE child process with
``TRITON_INTERPRET=1`` set before triton is imported (this file run as a script with
``--interpreter-worker``), at the conformance sizes; impls that can run nowhere here are listed with
the reason by :func:`test_every_declared_impl_runs_here_or_is_reported` (run pytest with ``-s`` to see it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.registry import Mechanism
from attnlab.testing import first_output, random_qkv, relative_error, run_options

OPS = [m for m in attnlab.mechanisms() if m.op is not None and m.reference is not None]
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def modes(record: Mechanism) -> list[bool]:
    return [c for c in (False, True) if (record.supports_causal if c else record.supports_bidirectional)]


def impl_modes(record: Mechanism, impl: str | None) -> list[bool]:
    """The masking regimes ``impl`` computes (a causal-only impl is not asked for bidirectional attention)."""
    return [c for c in modes(record) if c or impl not in record.causal_only_impls]


def op_cases() -> list:
    return [pytest.param(m, c, id=f"{m.name}-{'causal' if c else 'bidir'}") for m in OPS for c in modes(m)]


def impl_cases() -> list:
    cases = []
    for m in OPS:
        impls = ("auto", *m.impls_on("cpu")) if m.accepts("impl") else (None,)
        for impl in impls:
            for c in impl_modes(m, impl):
                cases.append(pytest.param(m, c, impl, id=f"{m.name}-{'causal' if c else 'bidir'}-{impl or 'op'}"))
    return cases


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_impls(record: Mechanism) -> tuple[str, ...]:
    """Impls that do not run on the CPU as such but do under the Triton interpreter (when triton is installed)."""
    if not triton_installed():
        return ()
    return tuple(i for i in record.impls if not record.impl_runs_on(i, "cpu")
                 and record.impl_runs_on(i, "triton-interpreter"))


def interpreter_cases() -> list[tuple[str, bool, str, str]]:
    """(mechanism, causal, impl, dtype id) of every interpreter run."""
    return [(m.name, c, impl, d) for m in OPS for impl in interpreter_impls(m) for c in impl_modes(m, impl)
            for d in DTYPES]


def not_run_here() -> list[tuple[str, str, str]]:
    """(mechanism, impl, why) for every declared impl this suite cannot run on this machine."""
    skipped = []
    for m in OPS:
        for impl in m.impls:
            if m.impl_runs_on(impl, "cpu") or impl in interpreter_impls(m):
                continue
            where = ", ".join(m.impl_devices[impl])
            why = (f"runs on {where}; triton is not installed for the interpreter"
                   if m.impl_runs_on(impl, "triton-interpreter") else f"runs on {where} only")
            skipped.append((m.name, impl, why))
    return skipped


def with_impl(options: dict, impl: str | None) -> dict:
    return options if impl is None else {**options, "impl": impl}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fast_path_errors(record: Mechanism, causal: bool, impl: str | None, dtype: torch.dtype) -> list[float]:
    """Relative errors of ``impl`` against the float64 reference: plain heads, then grouped heads (GQA)."""
    c = record.check
    errors = []
    for seed, grouped in ((1, False), (2, record.supports_gqa)):
        q, k, v = random_qkv(record, dtype=dtype, generator=seeded(seed),
                             kv_heads=c.kv_heads if grouped else None)
        options = run_options(record, causal=causal)
        out = first_output(record(q, k, v, **with_impl(options, impl)))
        expected = first_output(record.run_reference(q.double(), k.double(), v.double(), **options))
        assert out.dtype == dtype, f"{record.name} impl={impl} returned {out.dtype} for {dtype} inputs"
        assert out.shape == expected.shape
        errors.append(relative_error(out, expected) if torch.isfinite(out).all() else float("inf"))
    return errors


@pytest.mark.parametrize("record,causal,impl", impl_cases())
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_fast_path_equals_reference(record: Mechanism, causal: bool, impl: str | None, dtype: torch.dtype) -> None:
    c = record.check
    tolerance = c.float64_tolerance if dtype == torch.float64 else c.float32_tolerance
    for grouped, error in zip((False, True), fast_path_errors(record, causal, impl, dtype), strict=True):
        assert error <= tolerance, f"{record.name} impl={impl} grouped={grouped}: rel. error {error:.2e}"


def _interpreter_worker() -> None:
    """Child process (``TRITON_INTERPRET=1``): the errors of every interpreter case, as one JSON line."""
    results = {}
    for name, causal, impl, dtype in interpreter_cases():
        results[f"{name}-{causal}-{impl}-{dtype}"] = fast_path_errors(attnlab.get(name), causal, impl, DTYPES[dtype])
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, list[float]]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpreter-worker"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name,causal,impl,dtype", interpreter_cases(),
                         ids=[f"{n}-{'causal' if c else 'bidir'}-{i}-{d}" for n, c, i, d in interpreter_cases()])
def test_interpreted_kernel_equals_reference(interpreter_results: dict[str, list[float]], name: str, causal: bool,
                                             impl: str, dtype: str) -> None:
    """Triton impls run by the interpreter on CPU at the conformance sizes, against the float64 reference."""
    c = attnlab.get(name).check
    tolerance = c.float64_tolerance if dtype == "f64" else c.float32_tolerance
    errors = interpreter_results[f"{name}-{causal}-{impl}-{dtype}"]
    assert len(errors) == 2 and all(e <= tolerance for e in errors), f"{name} impl={impl}: rel. errors {errors}"


def test_every_declared_impl_runs_here_or_is_reported() -> None:
    """Each declared impl is compared with its reference above, or printed here with the reason it is not."""
    in_process = {(p.values[0].name, p.values[2]) for p in impl_cases()}
    interpreted = {(name, impl) for name, _, impl, _ in interpreter_cases()}
    skipped = not_run_here()
    for m in OPS:
        for impl in m.impls:
            covered = [(m.name, impl) in in_process, (m.name, impl) in interpreted,
                       any(s[:2] == (m.name, impl) for s in skipped)]
            assert sum(covered) == 1, f"{m.name} impl={impl!r}: covered {covered} (cpu, interpreter, reported)"
    if triton_installed():
        assert interpreted, "no impl declares the Triton interpreter, yet the lightning kernels run there"
    print("\nimpls not run on this machine:" if skipped else "\nevery declared impl ran against its reference")
    for name, impl, why in skipped:
        print(f"  {name} impl={impl!r}: {why}")


@pytest.mark.parametrize("record,causal", op_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bench_options_run_the_op(record: Mechanism, causal: bool, dtype: torch.dtype) -> None:
    """What the speed benchmark passes (``record.bench_options``) runs the op at a benchmark-like shape."""
    from attnlab.registry import BenchShape

    shape = BenchShape(batch=2, heads=4, kv_heads=2 if record.supports_gqa else 4, length=160, head_dim=16,
                       device=torch.device("cpu"), dtype=dtype)
    options = record.options_for_bench(shape)
    for value in options.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim > 1:
            assert value.dtype == dtype, f"{record.name}: a bench option tensor is {value.dtype}, not {dtype}"
    q, k, v = random_qkv(record, dtype=dtype, generator=seeded(11), length=160, head_dim=16, heads=4,
                         kv_heads=shape.kv_heads)
    out = first_output(record(q, k, v, causal=causal, **options))
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("record,causal", [p for p in op_cases() if p.values[0].supports_cross])
def test_cross_attention_lengths(record: Mechanism, causal: bool) -> None:
    c = record.check
    N = c.length
    M = c.key_length or N + 5
    q, k, v = random_qkv(record, dtype=torch.float64, generator=seeded(3), length=N, key_length=M)
    options = run_options(record, causal=causal)
    out = first_output(record(q, k, v, **options))
    expected = first_output(record.run_reference(q, k, v, **options))
    assert out.shape[:3] == (q.shape[0], q.shape[1], N)
    assert relative_error(out, expected) <= c.float64_tolerance


@pytest.mark.parametrize("record", [m for m in OPS if m.supports_causal], ids=lambda m: m.name)
def test_causal_does_not_look_ahead(record: Mechanism) -> None:
    q, k, v = random_qkv(record, dtype=torch.float64, generator=seeded(4))
    N = q.shape[2]
    options = run_options(record, causal=True)
    out = first_output(record(q, k, v, **options))
    for t in (0, N // 2, N - 2):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1:] += torch.randn(x[:, :, t + 1:].shape, generator=seeded(t), dtype=x.dtype) * 3
        out2 = first_output(record(q2, k2, v2, **options))
        torch.testing.assert_close(out2[:, :, : t + 1], out[:, :, : t + 1], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, t=t: f"{record.name}: outputs up to t={t} changed: {m}")
        assert not torch.allclose(out2[:, :, t + 1:], out[:, :, t + 1:]), "perturbation had no effect at all"


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("record,causal,impl", [p for p in impl_cases() if p.values[1]])
def test_nonfinite_key_does_not_reach_earlier_rows(record: Mechanism, causal: bool, impl: str | None, bad: float,
                                                   where: str) -> None:
    """A NaN/Inf in k or v at key t leaves every output before t exactly as it was, and row t is NaN.

    (Dense masked products used to leak it backwards: a masked weight is 0, but 0 * NaN = NaN.)
    """
    q, k, v = random_qkv(record, dtype=torch.float64, generator=seeded(12))
    N = q.shape[2]
    options = with_impl(run_options(record, causal=True), impl)
    clean = first_output(record(q, k, v, **options))
    for t in (1, N * 2 // 3, N - 1):
        k2, v2 = k.clone(), v.clone()
        (k2 if where == "k" else v2)[:, -1, t, 0] = bad  # the last kv head: every query head group is covered
        out = first_output(record(q, k2, v2, **options))
        torch.testing.assert_close(out[:, :, :t], clean[:, :, :t], rtol=1e-12, atol=1e-12,
                                   msg=lambda m, t=t: f"{record.name} impl={impl}: rows before t={t} changed: {m}")
        group = q.shape[1] // k.shape[1]
        assert torch.isnan(out[:, -group:, t]).all(), f"{record.name} impl={impl}: row {t} saw {bad} but is not NaN"


@pytest.mark.parametrize("record,causal", op_cases())
def test_batch_elements_are_independent(record: Mechanism, causal: bool) -> None:
    q, k, v = random_qkv(record, dtype=torch.float64, generator=seeded(5), batch=3)
    options = run_options(record, causal=causal)
    out = first_output(record(q, k, v, **options))
    for b in range(3):
        alone = first_output(record(q[b:b + 1], k[b:b + 1], v[b:b + 1], **options))
        torch.testing.assert_close(alone, out[b:b + 1], rtol=1e-9, atol=1e-9)
    q2 = q.clone()
    q2[1] = torch.randn(q2[1].shape, generator=seeded(6), dtype=q.dtype)
    out2 = first_output(record(q2, k, v, **options))
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("record,causal", [p for p in op_cases() if p.values[0].differentiable])
def test_gradients_reach_q_k_v(record: Mechanism, causal: bool) -> None:
    c = record.check
    q, k, v = random_qkv(record, dtype=torch.float64, generator=seeded(7), batch=1, heads=2,
                         length=c.gradcheck_length, head_dim=min(c.head_dim, 4), value_dim=3,
                         requires_grad=True)
    options = run_options(record, causal=causal)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return first_output(record(q, k, v, **options))

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)
    for x in (q, k, v):
        x.grad = None
    f(q, k, v).square().sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.grad is not None and x.grad.abs().sum() > 0, f"no gradient reached {name}"


@pytest.mark.parametrize("record,causal", op_cases())
def test_bfloat16_in_bfloat16_out(record: Mechanism, causal: bool) -> None:
    """Low precision at a realistic length: bf16 output within tolerance of the float64 reference."""
    c = record.check
    q, k, v = random_qkv(record, dtype=torch.bfloat16, generator=seeded(8), batch=1, heads=2,
                         length=c.bf16_length, head_dim=c.bf16_head_dim, value_dim=c.bf16_head_dim)
    options = run_options(record, causal=causal, bf16=True)
    out = first_output(record(q, k, v, **options))
    assert out.dtype == torch.bfloat16
    expected = first_output(record.run_reference(q.double(), k.double(), v.double(), **options))
    error = relative_error(out, expected)
    assert error <= c.bf16_tolerance, f"{record.name}: bf16 rel. error {error:.2e} at N={c.bf16_length}"


def bad_inputs(record: Mechanism) -> list[tuple[str, dict, type[Exception], str]]:
    """(label, changes, expected error type, a word the message must contain)."""
    q, k, v = random_qkv(record, generator=seeded(9))
    B, H, N, D = q.shape
    cases = [
        ("q 3-D", {"q": q[0]}, ValueError, "q"),
        ("k 5-D", {"k": k[None]}, ValueError, "k"),
        ("batch mismatch", {"k": k[:1], "v": v[:1]}, ValueError, "batch"),
        ("head dim mismatch", {"k": k[..., :-1]}, ValueError, "head dim"),
        ("k/v length mismatch", {"v": v[:, :, :-1]}, ValueError, "length"),
        ("integer q", {"q": q.to(torch.int64)}, TypeError, "dtype"),
        ("other device", {"k": k.to("meta"), "v": v.to("meta")}, ValueError, "device"),
        ("kv heads not dividing", {"k": torch.randn(B, 3, N, D), "v": torch.randn(B, 3, N, D)}, ValueError, "H"),
    ]
    if record.accepts("scale"):
        cases += [("scale zero", {"scale": 0.0}, ValueError, "scale"),
                  ("scale negative", {"scale": -1.0}, ValueError, "scale")]
    if record.accepts("attn_mask"):
        cases.append(("mask shape", {"attn_mask": torch.ones(N + 1, N + 2, dtype=torch.bool)}, ValueError, "attn_mask"))
    if record.accepts("key_padding_mask"):
        cases.append(("padding shape", {"key_padding_mask": torch.ones(B, N + 1, dtype=torch.bool)}, ValueError,
                      "key_padding_mask"))
    return cases


@pytest.mark.parametrize("record", OPS, ids=lambda m: m.name)
def test_bad_input_raises_with_a_clear_message(record: Mechanism) -> None:
    causal = modes(record)[0]
    for label, changes, error, word in bad_inputs(record):
        q, k, v = random_qkv(record, generator=seeded(9))
        args = {"q": q, "k": k, "v": v, **run_options(record, causal=causal)}
        args.update(changes)
        q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
        with pytest.raises(error) as info:
            record(q, k, v, **args)
        assert word.lower() in str(info.value).lower(), f"{record.name} / {label}: message {info.value!r}"


@pytest.mark.parametrize("record", OPS, ids=lambda m: m.name)
def test_options_are_type_checked(record: Mechanism) -> None:
    """A flag is a bool and a size an int: wrong types are a TypeError naming the option, through the op and
    through ``attnlab.attention`` (which used to read ``causal="yes"`` as a request for the causal form)."""
    q, k, v = random_qkv(record, generator=seeded(13))
    options = run_options(record, causal=modes(record)[0])
    wrong: list[tuple[str, object]] = [("causal", "yes"), ("causal", None), ("causal", 1)]
    for name, default in record.defaults.items():
        if isinstance(default, bool) and name != "causal":
            wrong += [(name, "yes"), (name, None), (name, 0)]
        elif isinstance(default, int) and not isinstance(default, bool):
            wrong += [(name, float(default)), (name, True), (name, "4")]
    for name in ("window", "kernel_size", "k_budget"):
        if name in record.required_options or name in record.defaults:
            wrong += [(name, 4.0), (name, None)]
    impls = [{}, {"impl": "reference"}] if record.accepts("impl") else [{}]  # the reference path too
    for (name, value), impl in ((w, i) for w in wrong for i in impls):
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            record.op(q, k, v, **{**options, name: value, **impl})
        if name == "causal":
            with pytest.raises(TypeError, match="causal"):
                attnlab.attention(q, k, v, mechanism=record.name, **{**options, name: value})


@pytest.mark.parametrize("record", [m for m in OPS if m.layer is None], ids=lambda m: m.name)
def test_generic_layer_runs_the_op(record: Mechanism) -> None:
    """``attnlab.nn.Attention(mechanism=name)`` wraps every parameter-free op."""
    causal = modes(record)[-1]
    options = {key: value for key, value in record.check.options.items()}
    heads = record.check.heads
    layer = attnlab.nn.Attention(heads * record.check.head_dim, heads, mechanism=record.name, causal=causal,
                                 **options).double()
    x = torch.randn(2, record.check.length, layer.dim, dtype=torch.float64, generator=seeded(10))
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


if __name__ == "__main__" and "--interpreter-worker" in sys.argv:
    _interpreter_worker()
