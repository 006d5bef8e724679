"""softmax_attention(impl="auto") picks SDPA backends by a fixed rule; timing happens only on request."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnlab.bench import softmax_backends as bench_backends
from attnlab.bench import timing
from attnlab.ops import softmax_attention, softmax_attention_reference, softmax_backend_report
from attnlab.ops import softmax_backends as sb
from attnlab.testing import relative_error

ALL = frozenset({"cudnn", "flash", "efficient", "math"})
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _fresh_log():
    sb.clear_softmax_backend_cache()
    yield
    sb.clear_softmax_backend_cache()


def _call(capability=(9, 0), dtype=BF16, head_dim=128, value_dim=None, mask_kind="causal", gqa=False,
          available=ALL, device_type="cuda") -> sb.SdpaCall:
    return sb.SdpaCall(device_type=device_type, capability=capability, dtype=dtype, head_dim=head_dim,
                       value_dim=head_dim if value_dim is None else value_dim, mask_kind=mask_kind, gqa=gqa,
                       available=frozenset(available))


# Expected orders written from the rule in the module docstring of attnlab.ops.softmax_backends.
RULE_CASES = [
    pytest.param(_call(), ("cudnn", "flash", "efficient", "math"), id="sm90-bf16-D128-causal"),
    pytest.param(_call(dtype=FP16, head_dim=64, mask_kind="none"), ("cudnn", "flash", "efficient", "math"),
                 id="sm90-fp16-D64-none"),
    pytest.param(_call(capability=(9, 0), head_dim=256), ("flash", "efficient", "math"), id="sm90-bf16-D256"),
    pytest.param(_call(head_dim=120), ("cudnn", "flash", "efficient", "math"), id="sm90-bf16-D120"),
    pytest.param(_call(head_dim=100), ("flash", "efficient", "math"), id="sm90-bf16-D100-not-multiple-of-8"),
    pytest.param(_call(mask_kind="mask"), ("efficient", "math"), id="sm90-bf16-mask-tensor"),
    pytest.param(_call(gqa=True), ("flash", "efficient", "math"), id="sm90-bf16-gqa"),
    pytest.param(_call(head_dim=128, value_dim=64), ("efficient", "math"), id="sm90-bf16-D128-Dv64"),
    pytest.param(_call(dtype=FP32), ("efficient", "math"), id="sm90-fp32"),
    pytest.param(_call(dtype=FP64), ("math",), id="sm90-fp64"),
    pytest.param(_call(available={"flash", "efficient", "math"}), ("flash", "efficient", "math"),
                 id="sm90-no-cudnn"),
    pytest.param(_call(available={"efficient", "math"}), ("efficient", "math"), id="sm90-cudnn-flash-disabled"),
    pytest.param(_call(available={"math"}), ("math",), id="sm90-only-math"),
    pytest.param(_call(available=set()), (), id="sm90-nothing-enabled"),
    pytest.param(_call(capability=(8, 0)), ("flash", "efficient", "math"), id="sm80-bf16"),
    pytest.param(_call(capability=(8, 9), dtype=FP16, head_dim=64), ("flash", "efficient", "math"), id="sm89-fp16"),
    pytest.param(_call(capability=(10, 0)), ("flash", "efficient", "math"), id="sm100-bf16"),
    pytest.param(_call(capability=(12, 0)), ("flash", "efficient", "math"), id="sm120-bf16"),
    pytest.param(_call(capability=(7, 0), dtype=FP16), ("efficient", "math"), id="sm70-fp16"),
    pytest.param(_call(capability=(7, 5), dtype=BF16), ("math",), id="sm75-bf16"),
    pytest.param(_call(capability=(9, 0), head_dim=512, dtype=FP16), ("efficient", "math"), id="sm90-fp16-D512"),
    pytest.param(_call(device_type="cpu", capability=None), (), id="cpu"),
    pytest.param(_call(device_type="mps", capability=None, dtype=FP32), (), id="mps"),
]


@pytest.mark.parametrize("call,expected", RULE_CASES)
def test_rule_gives_the_documented_order(call: sb.SdpaCall, expected: tuple[str, ...]) -> None:
    assert sb.softmax_backend_order(call) == expected


def test_rule_is_a_pure_function_of_its_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_device(*args, **kwargs):
        raise AssertionError("the rule asked the device")

    for name in ("get_device_capability", "is_available", "current_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, no_device)
    monkeypatch.setattr(sb, "available_sdpa_backends", no_device)
    calls = [case.values[0] for case in RULE_CASES]
    first = [sb.softmax_backend_order(call) for call in calls]
    assert first == [sb.softmax_backend_order(call) for call in reversed(calls)][::-1]
    assert sb._SEEN == {}  # the pure rule logs nothing


def _qkv(seed: int, *, B: int = 2, H: int = 4, Hkv: int = 4, N: int = 33, D: int = 16,
         dtype: torch.dtype = FP32, grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=g).to(dtype).requires_grad_(grad) for h in (H, Hkv, Hkv))


def test_cpu_keeps_sdpa_dispatch_and_logs_nothing() -> None:
    q, k, v = _qkv(0)
    out = softmax_attention(q, k, v, causal=True)
    assert relative_error(out, softmax_attention_reference(q.double(), k.double(), v.double(), causal=True)) < 1e-5
    assert softmax_backend_report() == []


def _cpu_as_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the CPU stand in for an sm90 device with every backend: the same code path as on CUDA (SDPA
    on the CPU then runs the first backend of the order that it has)."""
    monkeypatch.setattr(sb, "AUTO_DEVICE_TYPES", ("cpu",))
    describe = sb.sdpa_call_of
    monkeypatch.setattr(sb, "sdpa_call_of", lambda *args, **kwargs: dataclasses.replace(
        describe(*args, **kwargs), device_type="cuda", capability=(9, 0), available=ALL))


def _forbid_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    def timed(*args, **kwargs):
        raise AssertionError("a forward timed something")

    monkeypatch.setattr(timing, "time_callable", timed)
    monkeypatch.setattr(bench_backends, "time_callable", timed)
    monkeypatch.setattr(bench_backends, "measure_softmax_backends", timed)
    monkeypatch.setattr(torch.cuda, "Event", timed)
    monkeypatch.setattr(torch.cuda, "synchronize", timed)


@pytest.mark.parametrize("dtype,kv_heads,expected", [
    (BF16, 4, ("cudnn", "flash", "efficient", "math")),
    (BF16, 2, ("flash", "efficient", "math")),
    (FP32, 4, ("efficient", "math")),
], ids=["bf16", "bf16-gqa", "fp32"])
def test_auto_forward_and_backward_follow_the_rule_without_timing(monkeypatch: pytest.MonkeyPatch,
                                                                   dtype: torch.dtype, kv_heads: int,
                                                                   expected: tuple[str, ...]) -> None:
    _cpu_as_sm90(monkeypatch)
    _forbid_timing(monkeypatch)
    orders: list[tuple[str, ...]] = []
    forward = sb.sdpa_with_backends

    def spy(order, *args, **kwargs):
        orders.append(tuple(order))
        return forward(order, *args, **kwargs)

    monkeypatch.setattr("attnlab.ops.softmax.sdpa_with_backends", spy)
    priority = torch._C._get_sdp_priority_order()
    q, k, v = _qkv(1, Hkv=kv_heads, N=64, dtype=dtype, grad=True)
    out = softmax_attention(q, k, v, causal=True)
    out.float().square().sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected_out = softmax_attention_reference(qd, kd, vd, causal=True)
    expected_out.square().sum().backward()
    tolerance = 2e-2 if dtype == BF16 else 1e-5
    assert relative_error(out, expected_out) < tolerance
    for x, xd in ((q, qd), (k, kd), (v, vd)):
        assert relative_error(x.grad, xd.grad) < 2 * tolerance
    assert orders == [expected]
    assert torch._C._get_sdp_priority_order() == priority  # the order applies to that call only
    (entry,) = softmax_backend_report()
    assert entry["order"] == list(expected) and entry["backend"] == expected[0]
    assert entry["dtype"] == str(dtype).removeprefix("torch.") and entry["gqa"] == (kv_heads != 4)
    orders.clear()
    softmax_attention(q, k, v, causal=True, impl="sdpa")  # impl="sdpa": SDPA's own dispatch
    assert orders == [()]


def test_torch_sets_its_own_default_order_before_the_first_ordered_call(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_as_sm90(monkeypatch)
    monkeypatch.setattr(sb, "_TORCH_ORDER_READY", set())
    events: list[str] = []
    choice, kernel = torch._fused_sdp_choice, sb.sdpa_kernel
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: (events.append("choice"), choice(*a, **k))[1])
    monkeypatch.setattr(sb, "sdpa_kernel", lambda *a, **k: (events.append("sdpa_kernel"), kernel(*a, **k))[1])
    priority = torch._C._get_sdp_priority_order()
    for seed in (5, 6):
        q, k, v = _qkv(seed, dtype=BF16)
        softmax_attention(q, k, v, causal=True)
    assert events == ["choice", "sdpa_kernel", "sdpa_kernel"]  # once per process, before the first order
    assert torch._C._get_sdp_priority_order() == priority


def test_a_mask_tensor_changes_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_as_sm90(monkeypatch)
    _forbid_timing(monkeypatch)
    q, k, v = _qkv(2, dtype=BF16)
    padding = torch.ones(2, 33, dtype=torch.bool)
    padding[1, 30:] = False
    out = softmax_attention(q, k, v, causal=True, key_padding_mask=padding)
    expected = softmax_attention_reference(q.double(), k.double(), v.double(), causal=True, key_padding_mask=padding)
    assert relative_error(out, expected) < 2e-2
    assert [(r["mask_kind"], r["order"]) for r in softmax_backend_report()] == [("mask", ["efficient", "math"])]


def test_available_backends_follow_the_flags_of_sdpa_kernel() -> None:
    outside = sb.available_sdpa_backends()
    assert "math" in outside and outside <= ALL
    with sdpa_kernel([SDPBackend.MATH]):
        assert sb.available_sdpa_backends() == {"math"}
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        assert sb.available_sdpa_backends() == {"efficient", "math"}
    assert sb.available_sdpa_backends() == outside


def test_measurement_on_request_returns_the_table() -> None:
    fake = {"flash": 3.0, "math": 1.5, "default": 2.0}
    steps: list[str] = []

    def timer(name: str, step) -> float:
        step()  # the step runs forward + backward once
        steps.append(name)
        return fake[name]

    table = bench_backends.measure_softmax_backends(device="cpu", dtype=FP32, batch=1, heads=2, length=16, head_dim=8,
                                       backends=("cudnn", "flash", "math", "default"), timer=timer)
    assert table.times_ms == fake and table.fastest == "math" and steps == ["flash", "math", "default"]
    assert set(table.errors) == {"cudnn"}  # refused on the CPU, recorded
    assert table.rule_order == () and table.shape == (1, 2, 2, 16, 8, 8)
    row = table.as_dict()
    assert row["fastest"] == "math" and row["mask_kind"] == "causal" and row["dtype"] == "float32"


def test_measurement_with_the_default_timer_on_cpu() -> None:
    table = bench_backends.measure_softmax_backends(device="cpu", dtype=FP32, batch=1, heads=2, kv_heads=1, length=32,
                                       head_dim=8, mask_kind="mask", mode="fwd", backends=("math", "default"),
                                       warmup=1, repeats=2)
    assert set(table.times_ms) == {"math", "default"} and all(t > 0 for t in table.times_ms.values())
    assert table.call.gqa and table.call.mask_kind == "mask" and table.errors == {}


@pytest.mark.parametrize("kwargs,words", [
    ({"backends": ("fastest",)}, "backends contains ['fastest']"),
    ({"mask_kind": "sliding"}, "mask_kind='sliding'"),
    ({"mode": "bwd"}, "mode='bwd'"),
])
def test_measurement_option_errors_name_the_argument(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError) as info:
        bench_backends.measure_softmax_backends(device="cpu", dtype=FP32, batch=1, heads=1, length=8, head_dim=8,
                                                **kwargs)
    assert words in str(info.value)


def test_forcing_an_unknown_backend_is_an_error() -> None:
    q, k, v = _qkv(3)
    with pytest.raises(ValueError, match="backend='fastest'"):
        sb.sdpa_with_backend("fastest", q, k, v)


def test_bench_speed_times_the_backends_only_when_asked(tmp_path) -> None:
    import json

    from attnlab.cli import main

    assert main(["bench", "speed", "--preset", "smoke", "--softmax-backends", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "softmax_backends.jsonl").read_text().splitlines()]
    assert [(r["N"], r["mode"]) for r in rows] == [(32, "fwd"), (64, "fwd")]  # the smoke preset's shapes
    for row in rows:
        assert {"math", "default"} <= set(row["times_ms"]) and all(t > 0 for t in row["times_ms"].values())
        assert "cudnn" in row["errors"] and row["rule_order"] == [] and row["mask_kind"] == "causal"
        assert row["shape"] == [1, 2, 2, row["N"], 16, 16]
    assert not (tmp_path / "speed.jsonl").exists()  # no sweep ran
