"""softmax_attention(impl="auto") measures the SDPA backends once per configuration and uses the fastest."""

from __future__ import annotations

import pytest
import torch

from attnlab.ops import softmax_attention, softmax_attention_reference, softmax_backend_report
from attnlab.ops import softmax_backends as sb
from attnlab.testing import relative_error


@pytest.fixture(autouse=True)
def _fresh_cache():
    sb.clear_softmax_backend_cache()
    yield
    sb.clear_softmax_backend_cache()


def _qkv(seed: int, *, B: int = 2, H: int = 4, Hkv: int = 4, N: int = 33, D: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g))


def test_cpu_keeps_sdpa_dispatch_and_measures_nothing() -> None:
    q, k, v = _qkv(0)
    out = softmax_attention(q, k, v, causal=True)
    assert relative_error(out, softmax_attention_reference(q.double(), k.double(), v.double(), causal=True)) < 1e-5
    assert softmax_backend_report() == []


def test_auto_measures_once_per_configuration_and_uses_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    # Let the CPU stand in for a CUDA device: the same code path, with the backends the CPU has.
    monkeypatch.setattr(sb, "AUTO_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(sb, "PROBE_BATCH", 1)
    monkeypatch.setattr(sb, "PROBE_LENGTH", 64)
    calls: list[sb.BackendKey] = []
    measure = sb.measure_backends

    def counting(key: sb.BackendKey, **kwargs):
        calls.append(key)
        return measure(key, **kwargs)

    monkeypatch.setattr(sb, "measure_backends", counting)
    used: list[str | None] = []
    forward = sb.sdpa_with_backend

    def spy(backend, *args, **kwargs):
        used.append(backend)
        return forward(backend, *args, **kwargs)

    monkeypatch.setattr("attnlab.ops.softmax.sdpa_with_backend", spy)
    for seed in range(3):
        q, k, v = _qkv(seed)
        out = softmax_attention(q, k, v, causal=True)
        expected = softmax_attention_reference(q.double(), k.double(), v.double(), causal=True)
        assert relative_error(out, expected) < 1e-5
    assert len(calls) == 1  # measured once for (cpu, float32, D=16, causal, no GQA)
    q, k, v = _qkv(5, Hkv=2)
    softmax_attention(q, k, v)  # another mask kind and grouped heads: a second entry
    assert len(calls) == 2
    report = softmax_backend_report()
    assert [(r["mask_kind"], r["gqa"]) for r in report] == [("causal", False), ("none", True)]
    first = report[0]
    assert first["dtype"] == "float32" and first["head_dim"] == 16 and first["device"] == "cpu"
    assert set(first["times_ms"]) >= {"flash", "default"}  # the backends the CPU runs
    assert "cudnn" in first["errors"] and "efficient" in first["errors"]  # refused on the CPU, recorded
    assert first["backend"] == min(first["times_ms"], key=first["times_ms"].get)
    expected_backend = None if first["backend"] == "default" else first["backend"]
    assert used[:3] == [expected_backend] * 3
    # impl="sdpa" keeps SDPA's own choice
    used.clear()
    q, k, v = _qkv(7)
    softmax_attention(q, k, v, causal=True, impl="sdpa")
    assert used == [None]


def test_measurement_picks_the_fastest_backend() -> None:
    key = sb.BackendKey("cpu", "float32", 8, 8, "causal", False)
    fake = {"flash": 3.0, "math": 1.5, "default": 2.0}
    choice = sb.measure_backends(key, device=torch.device("cpu"), heads=2, kv_heads=2, batch=1, length=16,
                                 candidates=("cudnn", "flash", "math", "default"),
                                 timer=lambda name, step: (step(), fake[name])[1])
    assert choice.backend == "math" and choice.times_ms == fake
    assert set(choice.errors) == {"cudnn"}


def test_refusing_backend_falls_back_and_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sb, "AUTO_DEVICE_TYPES", ("cpu",))
    q, k, v = _qkv(3)
    key = sb.backend_key(q, k, v, is_causal=True, attn_mask=None)
    sb._CACHE[key] = sb.BackendChoice(key, "efficient")  # a choice this device cannot run
    out = softmax_attention(q, k, v, causal=True)
    assert relative_error(out, softmax_attention_reference(q.double(), k.double(), v.double(), causal=True)) < 1e-5
    (entry,) = softmax_backend_report()
    assert any(name.startswith("efficient (call") for name in entry["errors"])


def test_environment_forces_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sb, "AUTO_DEVICE_TYPES", ("cpu",))
    monkeypatch.setenv(sb.ENV_FORCE, "math")
    q, k, v = _qkv(4)
    assert sb.choose_backend(q, k, v, is_causal=False, attn_mask=None) == "math"
    (entry,) = softmax_backend_report()
    assert entry["forced"] and entry["backend"] == "math" and entry["times_ms"] == {}
    sb.clear_softmax_backend_cache()
    monkeypatch.setenv(sb.ENV_FORCE, "fastest")
    with pytest.raises(ValueError, match="ATTNLAB_SDPA_BACKEND='fastest'"):
        sb.choose_backend(q, k, v, is_causal=False, attn_mask=None)
