"""The Triton lightning kernels (attnlab.kernels.lightning) against float64 references, on CPU.

The kernels run under the Triton interpreter (``TRITON_INTERPRET=1``), which must be set before
triton is imported. So that no other test is affected, every kernel case runs in ONE child process
(this file run as a script with ``--worker``): it computes the relative errors of outputs, final
states and all gradients against two references and prints them as JSON; the tests below read
that JSON and assert on it. The references are (1) an independent masked-quadratic float64
transcription of the formula in this file (:func:`masked_oracle`) and (2)
``attnlab.ops.lightning_attention(impl="reference")``; gradients come from autograd through them.
Argument checks run in this process (they raise before any kernel starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (id, B, H, H_kv, N, D, Dv, chunk, decay kind, initial state, segments, dtype)
CASES = [
    ("B1-H2-N37-D16-Dv32-decayT-s0-seg1", 1, 2, 2, 37, 16, 32, 16, "tensor", True, 1, "float64"),
    ("B2-H2-N10-D16-Dv16-lt-chunk", 2, 2, 2, 10, 16, 16, 16, "float", True, None, "float64"),
    ("B1-H2-N45-D24-Dv40-nodecay", 1, 2, 2, 45, 24, 40, 16, None, False, None, "float64"),
    ("B2-H4-Hkv2-N70-D32-Dv16-gqa-seg3", 2, 4, 2, 70, 32, 16, 16, "tensor", True, 3, "float64"),
    ("B1-H2-Hkv1-N100-D16-Dv24-seg4-nodecay-s0", 1, 2, 1, 100, 16, 24, 16, None, True, 4, "float64"),
    ("B1-H1-N33-D64-Dv64-chunk32-seg2", 1, 1, 1, 33, 64, 64, 32, "tensor", True, 2, "float64"),
    ("B1-H1-N19-D256-Dv16-bigD", 1, 1, 1, 19, 256, 16, 16, "float", False, None, "float64"),
    ("B1-H2-N50-D16-Dv32-float32", 1, 2, 2, 50, 16, 32, 16, "tensor", True, 2, "float32"),
    ("B1-H2-N40-D32-Dv32-float16", 1, 2, 2, 40, 32, 32, 16, "tensor", True, None, "float16"),
    ("B1-H2-N40-D32-Dv32-bfloat16", 1, 2, 2, 40, 32, 32, 16, "tensor", True, 2, "bfloat16"),
]
# cases run a second time with the fused dK/dV backward kernel (TUNING["fused_bwd"] = True)
FUSED = ["B1-H2-N37-D16-Dv32-decayT-s0-seg1", "B2-H4-Hkv2-N70-D32-Dv16-gqa-seg3",
         "B1-H2-Hkv1-N100-D16-Dv24-seg4-nodecay-s0", "B1-H2-N40-D32-Dv32-bfloat16"]
RUNS = [(case, False) for case in CASES] + [(case, True) for case in CASES if case[0] in FUSED]
RUN_IDS = [case[0] + ("/fused-bwd" if fused else "") for case, fused in RUNS]
# relative-error bounds per dtype: float64 exact to rounding; float16/bfloat16 inputs are compared with
# the float64 reference on the same (rounded) inputs. The interpreter truncates float32 -> bfloat16
# (GPUs round to nearest), so the bfloat16 bound here is looser than the 3e-3 the GPU check uses.
TOLERANCE = {"float64": 1e-11, "float32": 2e-5, "float16": 1e-3, "bfloat16": 8e-3}


def masked_oracle(q, k, v, rates, scale, s0):
    """o_t = scale sum_{j<=t} lambda^(t-j) (q_t.k_j) v_j + scale lambda^(t+1) q_t S0;
    S_N = sum_j lambda^(N-1-j) k_j^T v_j + lambda^N S0 (float64, autograd-able)."""
    B, H, N, D = q.shape
    groups = H // k.shape[1]
    k = k.repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    t = torch.arange(N, dtype=torch.float64)
    lag = t[:, None] - t[None, :]
    r = rates[:, None, None] if rates is not None else torch.zeros(H, 1, 1, dtype=torch.float64)
    mask = torch.where(lag >= 0, torch.exp(-r * lag.clamp(min=0)), torch.zeros((), dtype=torch.float64))
    out = scale * torch.einsum("bhnd,bhmd,hnm,bhme->bhne", q, k, mask, v)
    state = torch.einsum("hm,bhmd,bhme->bhde", torch.exp(-r[:, :, 0] * (N - 1 - t)), k, v)
    if s0 is not None:
        out = out + scale * torch.exp(-r[:, :, 0] * (t + 1))[None, :, :, None] * torch.einsum("bhnd,bhde->bhne", q, s0)
        state = state + torch.exp(-r[:, 0, 0] * N)[None, :, None, None] * s0
    return out, state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _run_case(case, seed: int) -> dict[str, float]:
    from attnlab.kernels.lightning import lightning_attention_triton
    from attnlab.ops.lightning import lightning_attention

    name, B, H, Hkv, N, D, Dv, chunk, decay_kind, use_s0, segments, dtype_name = case
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    # inputs drawn in float64 and rounded to the case dtype; the references see the rounded values
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=gen, dtype=torch.float64).to(dtype)
    scale = 0.7 / D**0.5
    rates = None
    decay: object = None
    if decay_kind == "tensor":
        rates = torch.rand(H, generator=gen, dtype=torch.float64) * 0.4 + 0.01
        decay = rates.to(torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
        rates = decay.detach().double()
    elif decay_kind == "float":
        decay = 0.15
        rates = torch.full((H,), 0.15, dtype=torch.float64)
    s0 = torch.randn(B, H, D, Dv, generator=gen, dtype=torch.float64).float() if use_s0 else None
    if dtype == torch.float64 and s0 is not None:
        s0 = s0.double()
    leaves = [x.requires_grad_() for x in (q, k, v)]
    if s0 is not None:
        leaves.append(s0.requires_grad_())
    if isinstance(decay, torch.Tensor):
        leaves.append(decay)

    out, state = lightning_attention_triton(q, k, v, decay=decay, scale=scale, chunk_size=chunk,
                                            initial_state=s0, return_state=True, segments=segments)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grad_state = torch.randn(state.shape, generator=gen, dtype=torch.float64)
    loss = (out.double() * grad_out).sum() + (state.double() * grad_state).sum()
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    rq, rk, rv = ref_leaves[:3]
    rs0 = ref_leaves[3] if s0 is not None else None
    rrates = ref_leaves[-1] if isinstance(decay, torch.Tensor) else rates
    ref_out, ref_state = masked_oracle(rq, rk, rv, rrates, scale, rs0)
    ref_loss = (ref_out * grad_out).sum() + (ref_state * grad_state).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)

    names = ["dq", "dk", "dv"] + (["d_initial_state"] if s0 is not None else []) + (
        ["d_decay"] if isinstance(decay, torch.Tensor) else [])
    errors = {"out": _rel(out, ref_out), "state": _rel(state, ref_state)}
    errors.update({n: _rel(g, r) for n, g, r in zip(names, grads, ref_grads, strict=True)})
    errors["dtype_ok"] = float(out.dtype == dtype and state.dtype == (torch.float64 if dtype == torch.float64
                                                                      else torch.float32))
    # second reference: the op's own masked form (issue 3), float64 on the same inputs
    op_out, op_state = lightning_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                                           decay=None if rates is None else rates, scale=scale,
                                           initial_state=None if s0 is None else s0.detach().double(),
                                           return_state=True, impl="reference")
    errors["out_vs_op_reference"] = _rel(out, op_out)
    errors["state_vs_op_reference"] = _rel(state, op_state)
    return errors


def _worker_extras() -> dict[str, float]:
    """Checks that need the interpreter but are not a grid case."""
    from attnlab.kernels.lightning import TUNING, lightning_attention_triton, triton_runs_on
    from attnlab.ops.lightning import lightning_attention

    gen = torch.Generator().manual_seed(7)
    extras: dict[str, float] = {"runs_on_cpu_under_interpreter": float(triton_runs_on(torch.ones(1)))}
    # bf16: the high/low split of the float32 intermediates must beat plain 16-bit intermediates
    q, k, v = (torch.randn(1, 2, 256, 64, generator=gen).bfloat16() for _ in range(3))
    rates = torch.tensor([0.01, 0.1])
    ref = lightning_attention(q.double(), k.double(), v.double(), decay=rates.double(), impl="reference")
    for precise in (7, 0):
        TUNING["precise"] = precise
        out = lightning_attention_triton(q, k, v, decay=rates)
        extras[f"bf16_precise_{precise}"] = _rel(out, ref)
    TUNING["precise"] = None
    # chunk sizes the kernels do not have run with 64 and give the same function
    q, k, v = (torch.randn(1, 1, 20, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = lightning_attention(q, k, v, decay=0.2, impl="reference")
    extras["chunk_size_7"] = _rel(lightning_attention_triton(q, k, v, decay=0.2, chunk_size=7), ref)
    # a split sequence continued from the returned state equals one call
    o1, s1 = lightning_attention_triton(q[:, :, :11], k[:, :, :11], v[:, :, :11], decay=0.2, return_state=True,
                                        chunk_size=16)
    o2 = lightning_attention_triton(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], decay=0.2, initial_state=s1,
                                    chunk_size=16)
    extras["two_pieces"] = _rel(torch.cat([o1, o2], 2), ref)
    # torch.compile: the kernel call is one opaque region inside a compiled function
    compiled = torch.compile(lambda a, b, c: lightning_attention_triton(a, b, c, decay=0.2, chunk_size=16) * 2.0,
                             backend="eager", fullgraph=False)
    extras["torch_compile"] = _rel(compiled(q, k, v), 2.0 * ref)
    # non-contiguous inputs (a transposed [B, N, H, D] view)
    qt, kt, vt = (torch.randn(1, 20, 2, 16, generator=gen, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    ref = lightning_attention(qt, kt, vt, decay=0.2, impl="reference")
    extras["strided_inputs"] = _rel(lightning_attention_triton(qt, kt, vt, decay=0.2, chunk_size=16), ref)
    extras.update(_linear_case(gen))
    extras.update(_op_dispatch_case(gen))
    return extras


def _op_dispatch_case(gen: torch.Generator) -> dict[str, float]:
    """The public ops reach the kernels with impl="triton" (the path "auto" takes on CUDA)."""
    import attnlab.kernels.lightning as kernels
    from attnlab.ops import lightning_attention, linear_attention

    calls = []
    apply = kernels._LightningTriton.apply
    kernels._LightningTriton.apply = lambda *args: (calls.append(1), apply(*args))[1]
    try:
        q, k, v = (torch.randn(1, 2, 29, 16, generator=gen, dtype=torch.float32) for _ in range(3))
        ref = lightning_attention(q.double(), k.double(), v.double(), decay=0.3, impl="reference")
        out = {"op_lightning_triton": _rel(lightning_attention(q, k, v, decay=0.3, impl="triton"), ref)}
        ref = linear_attention(q.double(), k.double(), v.double(), causal=True, impl="reference")
        out["op_linear_triton"] = _rel(linear_attention(q, k, v, causal=True, impl="triton"), ref)
    finally:
        kernels._LightningTriton.apply = apply
    out["op_kernel_calls"] = float(len(calls))
    return out


def _linear_case(gen: torch.Generator) -> dict[str, float]:
    """linear_attention_triton (elu+1, normalized, GQA, initial state) vs the linear op's reference."""
    import torch.nn.functional as F

    from attnlab.kernels.lightning import linear_attention_triton
    from attnlab.ops.linear import linear_attention

    B, H, Hkv, N, D, Dv = 1, 4, 2, 37, 16, 24
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, N, Dv, generator=gen, dtype=torch.float64, requires_grad=True)
    S0 = torch.rand(B, H, D, Dv, generator=gen, dtype=torch.float64)
    z0 = torch.rand(B, H, D, generator=gen, dtype=torch.float64) + 0.5
    errors = {}
    for normalize in (True, False):
        state = (S0, z0)
        out, final = linear_attention_triton(q, k, v, feature_map=lambda x: F.elu(x) + 1, normalize=normalize,
                                             eps=1e-6, scale=0.5, chunk_size=16, initial_state=state,
                                             return_state=True)
        ref, ref_final = linear_attention(q, k, v, causal=True, feature_map="elu+1", normalize=normalize, eps=1e-6,
                                          scale=0.5, initial_state=(S0, z0), return_state=True, impl="reference")
        gout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad((out * gout).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * gout).sum(), (q, k, v))
        tag = "normalized" if normalize else "plain"
        errors[f"linear_{tag}_out"] = _rel(out, ref)
        errors[f"linear_{tag}_S"] = _rel(final[0], ref_final[0])
        errors[f"linear_{tag}_z"] = _rel(final[1], ref_final[1])
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
            errors[f"linear_{tag}_{name}"] = _rel(g, r)
    return errors


def _worker() -> None:
    from attnlab.kernels.lightning import TUNING

    results = {}
    for index, ((case, fused), run_id) in enumerate(zip(RUNS, RUN_IDS, strict=True)):
        TUNING["fused_bwd"] = fused
        results[run_id] = _run_case(case, seed=1000 + index)
    TUNING["fused_bwd"] = None
    results["extras"] = _worker_extras()
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize(("case", "run_id"), [(case, run_id) for (case, _), run_id in zip(RUNS, RUN_IDS, strict=True)],
                         ids=RUN_IDS)
def test_kernel_matches_references(interpreter_results: dict, case: tuple, run_id: str) -> None:
    errors = interpreter_results[run_id]
    tol = TOLERANCE[case[-1]]
    assert errors.pop("dtype_ok") == 1.0, "output must keep the input dtype, state float32/float64"
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    expected = {"out", "state", "dq", "dk", "dv", "out_vs_op_reference", "state_vs_op_reference"}
    assert expected <= set(errors)
    if case[9]:
        assert "d_initial_state" in errors
    if case[8] == "tensor":
        assert "d_decay" in errors


def test_bf16_high_low_split_is_more_accurate(interpreter_results: dict) -> None:
    extras = interpreter_results["extras"]
    assert extras["bf16_precise_7"] < 0.75 * extras["bf16_precise_0"], extras
    assert extras["bf16_precise_7"] < 1e-2, extras


def test_interpreter_extras(interpreter_results: dict) -> None:
    extras = interpreter_results["extras"]
    assert extras["runs_on_cpu_under_interpreter"] == 1.0
    for name in ("chunk_size_7", "two_pieces", "torch_compile", "strided_inputs"):
        assert extras[name] < 1e-11, (name, extras[name])
    assert extras["op_kernel_calls"] == 2.0, "the ops' impl='triton' did not run the kernels"
    assert extras["op_lightning_triton"] < 2e-5 and extras["op_linear_triton"] < 2e-5, extras


def test_linear_attention_through_the_lightning_kernels(interpreter_results: dict) -> None:
    extras = interpreter_results["extras"]
    linear = {name: err for name, err in extras.items() if name.startswith("linear_")}
    assert len(linear) == 12, linear
    bad = {name: err for name, err in linear.items() if not err < 1e-11}
    assert not bad, bad


# ---- in this process (no interpreter): argument checks and device selection ----


def _qkv(B=1, H=2, N=8, D=16, Dv=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(B, H, N, D, generator=gen, dtype=dtype), torch.randn(B, H, N, D, generator=gen, dtype=dtype),
            torch.randn(B, H, N, Dv, generator=gen, dtype=dtype))


@pytest.mark.parametrize(("programs", "n_chunks"), [(1024, 16), (256, 64), (64, 256), (16, 1024), (2, 3), (200, 1)])
def test_segment_plan_fills_the_device_without_needless_splits(programs: int, n_chunks: int) -> None:
    from attnlab.kernels.lightning import _fewest_steps

    sms = 132
    n = _fewest_steps(programs, n_chunks, sms)
    assert 1 <= n <= n_chunks
    if programs >= sms:
        assert n == 1, "a full wave of programs needs no split (the split costs a states-only pass)"
    elif n_chunks >= 64:
        assert programs * n >= sms, "long sequences with few programs must fill every multiprocessor"
        assert -(-n_chunks // n) <= n_chunks // 2


def test_triton_runs_on_cpu_only_under_interpreter() -> None:
    from attnlab.kernels.lightning import _interpreting, triton_runs_on

    assert triton_runs_on(torch.ones(1)) == _interpreting()


def test_cpu_without_interpreter_raises_not_implemented() -> None:
    from attnlab.kernels import lightning_attention_triton

    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        lightning_attention_triton(q, k, v)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (lambda q, k, v: dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "q must be float16"),
        (lambda q, k, v: dict(k=k[:, :, :5], v=v[:, :, :5]), ValueError, "length N=8"),
        (lambda q, k, v: dict(v=torch.randn(1, 2, 8, 300)), ValueError, "Dv=300"),
        (lambda q, k, v: dict(decay=torch.rand(3)), ValueError, r"shape \[H\] = \[2\]"),
        (lambda q, k, v: dict(segments=0), ValueError, "segments must be a positive int"),
    ],
)
def test_the_kernel_checks_what_it_needs(change, error, pattern) -> None:
    """What the kernels assume beyond the op's validation (dtype, equal lengths, D <= 256, one rate per head)."""
    from attnlab.kernels import lightning_attention_triton

    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args.update(change(q, k, v))
    q_, k_, v_ = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=pattern):
        lightning_attention_triton(q_, k_, v_, **args)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (lambda q, k, v: dict(q=q[0]), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v: dict(k=k.double()), TypeError, "one dtype"),
        (lambda q, k, v: dict(k=k[:, :, :5], v=v[:, :, :5]), ValueError, "length of q"),
        (lambda q, k, v: dict(k=k[..., :8]), ValueError, "head dim of q"),
        (lambda q, k, v: dict(k=k[:, :1].expand(1, 1, 8, 16), v=v), ValueError, "same number of heads"),
        (lambda q, k, v: dict(decay=-0.5), ValueError, "decay must be finite rates"),
        (lambda q, k, v: dict(decay="fast"), TypeError, "decay must be None"),
        (lambda q, k, v: dict(decay=torch.rand(3)), ValueError, r"shape \[H\] = \[2\]"),
        (lambda q, k, v: dict(decay=torch.tensor([0.1, -1.0])), ValueError, "finite rates"),
        (lambda q, k, v: dict(scale=float("nan")), ValueError, "scale must be a positive finite"),
        (lambda q, k, v: dict(scale="1"), TypeError, "scale must be a float"),
        (lambda q, k, v: dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (lambda q, k, v: dict(chunk_size=16.0), TypeError, "chunk_size must be an int"),
        (lambda q, k, v: dict(initial_state=torch.randn(1, 2, 16, 15)), ValueError, "initial_state must have shape"),
        (lambda q, k, v: dict(initial_state=[1.0]), TypeError, "initial_state must be a torch.Tensor"),
    ],
)
def test_the_op_validates_before_the_kernel_runs(change, error, pattern) -> None:
    """impl='triton' goes through the op's checks first: the kernel trusts them (it does not repeat them)."""
    from attnlab.ops import lightning_attention

    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args.update(change(q, k, v))
    q_, k_, v_ = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=pattern):
        lightning_attention(q_, k_, v_, impl="triton", **args)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
