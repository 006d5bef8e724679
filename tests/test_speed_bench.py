"""The speed benchmark: timing and memory helpers, exponent fit, skip-on-estimate, resume, CLI, report."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.bench import cells, externals, memory, scaling, speed, speed_config, speed_plan
from attnlab.bench.results import load_results
from attnlab.bench.speed_report import render_speed_section
from attnlab.bench.timing import time_callable
from attnlab.cli import main


class FakeClock:
    """A clock that advances by the next given step every time the timed function runs."""

    def __init__(self, steps: list[float]) -> None:
        self.steps, self.now, self.calls = list(steps), 0.0, 0

    def __call__(self) -> float:
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += self.steps.pop(0)


def test_time_callable_reports_median_and_quartiles_after_warmup() -> None:
    steps = [9.0, 0.004, 0.001, 0.003, 0.002, 0.005]  # the first (9 s) is the warm-up call
    clock = FakeClock(steps)
    timing = time_callable(clock.work, warmup=1, repeats=5, max_repeats=5, clock=clock)
    assert clock.calls == 6
    assert timing.repeats == 5
    assert timing.median_ms == pytest.approx(3.0)
    assert timing.q25_ms == pytest.approx(2.0) and timing.q75_ms == pytest.approx(4.0)
    assert timing.spread == pytest.approx(2.0 / 3.0)


def test_time_callable_repeats_until_min_seconds_or_max_repeats() -> None:
    clock = FakeClock([0.1] * 50)
    timing = time_callable(clock.work, warmup=0, repeats=2, max_repeats=50, min_seconds=0.75, clock=clock)
    assert timing.repeats == 8  # 8 x 0.1 s is the first total >= 0.75 s
    clock = FakeClock([0.1] * 50)
    assert time_callable(clock.work, warmup=0, repeats=2, max_repeats=4, min_seconds=10, clock=clock).repeats == 4
    clock = FakeClock([5.0, 2.0, 2.0, 2.0])  # a slow cell: the warm-up alone spends the budget
    assert time_callable(clock.work, warmup=1, repeats=3, max_seconds=1.0, clock=clock).repeats == 1
    with pytest.raises(ValueError, match="repeats"):
        time_callable(clock.work, repeats=0)


def test_time_callable_measures_real_work() -> None:
    x = torch.randn(256, 256)
    small = time_callable(lambda: x @ x, repeats=5)
    big_x = torch.randn(768, 768)
    big = time_callable(lambda: big_x @ big_x, repeats=5)
    assert 0 < small.median_ms < big.median_ms  # 27x the flops


@pytest.mark.parametrize("exponent", [1.0, 1.7, 2.0, 3.0])
def test_fit_exponent_recovers_a_known_power_law(exponent: float) -> None:
    rng = random.Random(int(exponent * 10))
    lengths = [256, 512, 1024, 2048, 4096, 8192]
    values = [3.7 * n**exponent * math.exp(rng.gauss(0, 0.03)) for n in lengths]
    assert scaling.fit_exponent(lengths, values) == pytest.approx(exponent, abs=0.05)


def test_fit_exponent_needs_two_distinct_points() -> None:
    assert scaling.fit_exponent([1024], [5.0]) is None
    assert scaling.fit_exponent([1024, 1024], [5.0, 6.0]) is None
    assert scaling.fit_exponent([512, 1024, 2048], [1.0, 0.0, 4.0]) == pytest.approx(1.0)  # zero dropped


def test_predict_next_extrapolates_the_last_points() -> None:
    # exact power law N^1.5 through the last two points
    assert scaling.predict_next([1000, 2000], [10.0, 10 * 2**1.5], 8000, default_exponent=1) == pytest.approx(
        10 * 8**1.5)
    # one point: the default exponent
    assert scaling.predict_next([1000], [4.0], 3000, default_exponent=2) == pytest.approx(36.0)
    # a flat start (launch overhead) cannot hide a quadratic cost: exponent floored at default / 2
    assert scaling.predict_next([1000, 2000], [5.0, 5.0], 4000, default_exponent=2) == pytest.approx(10.0)
    assert scaling.predict_next([], [], 4000, default_exponent=2) is None


def test_complexity_and_first_estimate() -> None:
    softmax = attnlab.get("softmax")
    assert scaling.complexity_exponent(softmax, "auto") == 2.0
    linear = attnlab.get("linear")
    assert scaling.complexity_exponent(linear, "auto") == 1.0
    assert scaling.complexity_exponent(linear, "reference") == 2.0
    io = 4 * 1 * 4 * 1024 * 64 * 4
    assert scaling.estimate_cell(batch=1, heads=4, length=1024, dim=64, dtype_bytes=4, mode="fwd", exponent=1) == io
    quad = scaling.estimate_cell(batch=1, heads=4, length=1024, dim=64, dtype_bytes=4, mode="fwd", exponent=2)
    assert quad == io + 4 * 1024 * 1024 * 4 * 2


_KNOWN_ALLOCATION = """
import torch
from attnlab.bench import memory

def setup():
    x = torch.ones(16 * 2**20 // 4)  # a 16 MiB input, made after the baseline: counted

    def call():
        y = torch.empty(32 * 2**20 // 4).fill_(2.0)  # a 32 MiB temporary, freed before returning
        y.add_(x[0])

    return call

held = torch.ones(64 * 2**20 // 4)  # memory the process held before: never counted
print(memory.cpu_peak_memory_inline(setup))
assert held.sum() > 0
"""


def test_inline_peak_memory_measures_a_known_allocation_above_the_baseline() -> None:
    # in a fresh interpreter, as the benchmark's cells measure: inside a long pytest session the
    # allocator state left by earlier tests decides whether the input's pages are fresh
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _KNOWN_ALLOCATION], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split()[-1])
    assert abs(peak - 48 * 2**20) < 2 * 2**20, peak / 2**20  # 16 + 32 MiB, within 2 MiB

    def quiet_setup():
        x = torch.randn(100, 100)
        return lambda: x.sum()

    # a call that allocates almost nothing reads as almost nothing (the warm-up took the first-call costs)
    assert memory.cpu_peak_memory_inline(quiet_setup) < memory.MEMORY_RESOLUTION_BYTES


def test_subprocess_memory_leaves_out_the_interpreter_and_first_call_costs() -> None:
    spec = cells.cell_spec(mechanism="softmax", impl="auto", path="op", N=64, mode="fwd", causal=True,
                            batch=1, heads=4, dim=32, dtype="float32", device="cpu", seed=0)
    # inputs and output of 4 x [1, 4, 64, 32] float32 = 128 KiB; the process itself holds hundreds of MiB
    assert memory.cpu_peak_memory_subprocess(spec) < 2 * 2**20


def test_memory_cells_say_not_measured_or_unresolved_never_zero_or_dash() -> None:
    from attnlab.bench.speed_report import memory_ratio, memory_text

    assert memory_text({"peak_bytes": None}) == "not measured"
    assert memory_text({}) == "not measured"
    assert memory_text({"peak_bytes": 0}) == "< 0.25 MiB"
    assert memory_text({"peak_bytes": 3 * 2**20}) == "3 MiB"
    assert memory_ratio({"peak_bytes": 0}, {"peak_bytes": 2**20}) is None  # unresolved: no ratio
    assert memory_ratio({"peak_bytes": 2**21}, {"peak_bytes": 2**20}) == 2.0


def test_length_cap_skips_long_cells_of_capped_mechanisms_and_their_unused_baseline(tmp_path: Path) -> None:
    lines: list[str] = []
    # no time limit: this test is about the length cap, and on a loaded machine the smoke preset's
    # 0.5 s per call, extrapolated from a slow N=64 cell, can skip N=128 for time instead
    rows = speed.run_speed_benchmark(preset="smoke", out_dir=tmp_path, mechanisms="softmax,linear,agent",
                                     lengths=(32, 64, 128), length_cap=64, length_cap_exempt=("linear",),
                                     max_cell_seconds=math.inf, say=lines.append)
    status = {(r["mechanism"], r["causal"], r["N"]): r["status"] for r in rows}
    assert status[("linear", True, 128)] == "ok" and status[("softmax", True, 128)] == "ok"
    assert status[("agent", False, 64)] == "ok" and status[("agent", False, 128)] == "skipped"
    capped = next(r for r in rows if r["mechanism"] == "agent" and r["N"] == 128)
    assert capped["reason"].startswith("length cap: N <= 64")
    # bidirectional softmax only serves agent: not timed where agent is capped
    timed = {(r["mechanism"], r["causal"], r["N"]) for r in load_results(tmp_path / speed_config.RESULTS_FILE)}
    assert ("softmax", False, 64) in timed and ("softmax", False, 128) not in timed
    markdown = (tmp_path / "speed.md").read_text()
    assert "not run (length cap)" in markdown
    assert "- not run at N=128 (the preset's length cap, to fit its time budget): agent" in markdown


def test_crossover_lines_say_where_a_mechanism_overtakes_softmax() -> None:
    from attnlab.bench.speed_report import crossover_lines

    def row(name: str, N: int, ratio: float, mode: str = "fwd") -> dict:
        return {"kind": "speed", "mechanism": name, "impl": "auto", "mode": mode, "causal": True, "N": N,
                "status": "ok", "time_ms": ratio, "time_ratio": ratio}

    rows = [row("softmax", n, 1.0) for n in (256, 1024, 4096)]
    rows += [row("lightning", 256, 2.0), row("lightning", 1024, 0.9), row("lightning", 4096, 0.2)]
    rows += [row("flow", 256, 0.5), row("flow", 1024, 1.2), row("flow", 4096, 0.8)]  # dips, rises, falls
    rows += [row("hip", 256, 3.0), row("hip", 1024, 2.0)]
    rows += [row("agent", 256, 0.5), row("agent", 1024, 0.1)]
    assert crossover_lines(rows) == [
        "agent fwd: faster than softmax at every length measured, N=256..1024 (x0.10 at N=1024)",
        "flow fwd: faster than softmax from N=4096 on (x0.80 at N=4096)",
        "hip fwd: not faster than softmax up to N=1024 (x2.00 at N=1024)",
        "lightning fwd: faster than softmax from N=1024 on (x0.20 at N=4096)",
    ]


def test_subprocess_memory_separates_dense_from_flash_attention() -> None:
    spec = cells.cell_spec(mechanism="softmax", impl="reference", path="op", N=2048, mode="fwd", causal=True,
                            batch=1, heads=4, dim=32, dtype="float32", device="cpu", seed=0)
    dense = memory.cpu_peak_memory_subprocess(spec)
    sdpa = memory.cpu_peak_memory_subprocess({**spec, "impl": "auto"})
    scores = 4 * 2048 * 2048 * 4  # one float32 [B, H, N, N] matrix: 64 MiB
    assert dense >= scores
    assert sdpa < dense - scores / 2


def test_probe_estimate_measures_a_short_cell_in_a_subprocess() -> None:
    spec = cells.cell_spec(mechanism="softmax", impl="reference", path="op", N=4096, mode="fwd", causal=True,
                            batch=1, heads=4, dim=32, dtype="float32", device="cpu", seed=0)
    estimate, basis = speed_plan.probe_estimate(spec, 2.0, (), fallback=(1.0, "analytic"))
    assert basis.startswith("probes at N=256, 512 measured")
    scores = 4 * 4096 * 4096 * 4  # the dense float32 scores of the full cell: 256 MiB
    assert scores <= estimate < 4 * scores


def test_run_skips_cells_by_estimate_and_records_why(tmp_path: Path) -> None:
    lines: list[str] = []
    rows = speed.run_speed_benchmark(preset="smoke", out_dir=tmp_path, mechanisms="softmax",
                                     impls=("auto", "reference"), lengths=(32, 4096), modes=("fwd",),
                                     memory_limit_gb=0.05, max_cell_seconds=600, say=lines.append,
                                     write_report=False)
    by_cell = {(r["impl"], r["N"]): r for r in rows}
    assert by_cell[("auto", 32)]["status"] == "ok" and by_cell[("reference", 32)]["status"] == "ok"
    skipped = by_cell[("reference", 4096)]
    assert skipped["status"] == "skipped" and "GiB" in skipped["reason"] and "> limit 0.05 GiB" in skipped["reason"]
    assert skipped["estimate_basis"] == "analytic" and "(analytic)" in skipped["reason"]  # memory="none": no probe
    assert skipped["estimate_bytes"] > 0.05 * 2**30  # the dense [1, 2, 4096, 4096] scores alone are 128 MiB
    assert any("skipped: estimated" in line for line in lines)
    # a time limit: the second length is predicted over it from the first measurement
    rows = speed.run_speed_benchmark(preset="smoke", out_dir=tmp_path / "t", mechanisms="linear", lengths=(32, 64),
                                     modes=("fwd",), max_cell_seconds=1e-9, write_report=False, say=lines.append)
    linear = sorted((r for r in rows if r["mechanism"] == "linear"), key=lambda r: r["N"])
    assert [r["status"] for r in linear] == ["ok", "skipped"]
    assert "s per call > limit" in linear[1]["reason"] and linear[1]["estimate_ms"] > 0
    # the softmax baseline of the ratios is never skipped for time
    assert [r["status"] for r in rows if r["mechanism"] == "softmax"] == ["ok", "ok"]


def test_a_rerun_decides_skipped_cells_again_under_its_own_limits(tmp_path: Path) -> None:
    """A cell skipped for time is not reused as done: the same limit leaves it skipped, a larger one
    measures it."""
    kwargs = dict(preset="smoke", out_dir=tmp_path, mechanisms="linear", lengths=(32, 64), modes=("fwd",),
                  write_report=False, say=lambda line: None)
    results = tmp_path / speed_config.RESULTS_FILE

    def linear_at_64() -> list[str]:
        return [r["status"] for r in load_results(results) if r["mechanism"] == "linear" and r["N"] == 64]

    speed.run_speed_benchmark(max_cell_seconds=1e-9, **kwargs)
    assert linear_at_64() == ["skipped"]
    speed.run_speed_benchmark(max_cell_seconds=1e-9, **kwargs)
    written = linear_at_64()
    assert written[0] == "skipped" and set(written) == {"skipped"}
    rows = speed.run_speed_benchmark(max_cell_seconds=600, **kwargs)
    assert linear_at_64()[-1] == "ok"
    assert [r["status"] for r in rows if r["mechanism"] == "linear"] == ["ok", "ok"]


def test_resume_runs_only_missing_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = dict(preset="smoke", out_dir=tmp_path, mechanisms="softmax,linear", modes=("fwd",), write_report=False,
                  say=lambda line: None)
    first = speed.run_speed_benchmark(**kwargs)
    assert len(first) == 4 and all(r["status"] == "ok" for r in first)
    results = tmp_path / speed_config.RESULTS_FILE
    assert len(load_results(results)) == 4
    # drop the last cell (an interrupted run) and leave a truncated line behind
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    measured: list[tuple[str, int]] = []
    measure = speed._measure

    def counting(spec, config, externals):
        measured.append((spec["mechanism"], spec["N"]))
        return measure(spec, config, externals)

    monkeypatch.setattr(speed, "_measure", counting)
    second = speed.run_speed_benchmark(**kwargs)
    missing = json.loads(lines[-1])
    assert measured == [(missing["mechanism"], missing["N"])]
    assert len(load_results(results)) == 4
    assert {(r["mechanism"], r["N"]) for r in second} == {(r["mechanism"], r["N"]) for r in first}
    measured.clear()
    speed.run_speed_benchmark(**kwargs)
    assert measured == []


def test_ratios_are_to_softmax_in_the_same_run(tmp_path: Path) -> None:
    rows = speed.run_speed_benchmark(preset="smoke", out_dir=tmp_path, mechanisms="linear", modes=("fwd",),
                                     lengths=(2048, 4096), dim=64, memory="subprocess", max_cell_seconds=60,
                                     say=lambda line: None, write_report=False)
    base = {r["N"]: r for r in rows if r["mechanism"] == "softmax"}
    assert set(base) == {2048, 4096}  # softmax timed although only linear was asked for
    for row in rows:
        assert row["time_ratio"] == pytest.approx(row["time_ms"] / base[row["N"]]["time_ms"])
        assert row["peak_bytes"] > 0 and row["memory_ratio"] == pytest.approx(
            row["peak_bytes"] / base[row["N"]]["peak_bytes"])


def test_missing_external_package_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = externals.ExternalBaseline("nopkg:a", "nopkg", "attnlab_no_such_package.ops", ("cpu",), True,
                                  lambda *a: (lambda: None))
    monkeypatch.setattr(externals, "EXTERNALS", (fake, dataclasses.replace(fake, name="nopkg:b")))
    said: list[str] = []
    assert externals.available_externals(["nopkg"], "cpu", report=said.append) == []
    assert len(said) == 1 and "'nopkg' not available" in said[0]
    said.clear()
    assert externals.available_externals(["fla"], "cpu", report=said.append) == []


def test_non_mixer_layers_are_skipped_with_a_reason() -> None:
    pooling = attnlab.Mechanism(name="pool_only", op=None, reference=None, layer=torch.nn.Identity, family="x",
                                paper="p", arxiv=None, supports_causal=False, supports_bidirectional=True,
                                complexity="O(N)", role="pooling")
    said: list[str] = []
    plan = speed_plan.plan_series([pooling, attnlab.get("softmax")], speed_config.PRESETS["smoke"], [], said.append)
    assert [p[0] for p in plan] == ["softmax"]
    assert "skipping 'pool_only'" in said[0] and "pooling" in said[0]


def test_layers_get_a_softmax_layer_baseline_in_the_same_run() -> None:
    """Layers are timed with their projections, so they are compared with softmax inside the same
    projections (attnlab.nn.Attention), planned once after them; an op-only sweep gets no such row."""
    config = speed_config.PRESETS["smoke"]
    plan = speed_plan.plan_series([attnlab.get("softmax"), attnlab.get("moh"), attnlab.get("minimal")], config, [],
                                  lambda _: None)
    assert [(p[0], p[1], p[2]) for p in plan] == [("softmax", "auto", "op"), ("moh", "layer", "layer"),
                                                  ("minimal", "layer", "layer"), ("softmax", "layer", "layer")]
    ops_only = speed_plan.plan_series([attnlab.get("softmax"), attnlab.get("linear")], config, [], lambda _: None)
    assert all(p[2] == "op" for p in ops_only)
    spec = cells.cell_spec(mechanism="softmax", impl="layer", path="layer", N=16, mode="fwdbwd", causal=True,
                           batch=2, heads=2, dim=8, dtype="float32", device="cpu", seed=0)
    cells.build_cell(spec)()  # an op runs as a layer: x [B, N, H*D] through attnlab.nn.Attention


def test_cli_smoke_preset_covers_every_registered_mechanism(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "speed", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "speed.md").read_text()
    for record in attnlab.mechanisms():
        if record.op is not None or record.role == "mixer":
            assert f"| {record.name} |" in text, record.name
    assert (tmp_path / "speed_time_fwd.png").stat().st_size > 1000
    html, markdown = render_speed_section(tmp_path)
    # one figure per quantity for the one mode: time, time over softmax's, memory
    assert html.count("data:image/png;base64,") == 3 and "<table" in html
    assert "| softmax | auto | fwd | yes | " in markdown and "(x1.00)" in markdown
    assert "Memory: none (not measured)" in markdown and "| not measured |" in markdown
    assert main(["bench", "speed", "--preset", "nosuch", "--out", str(tmp_path)]) == 2
    assert "preset='nosuch'" in capsys.readouterr().err  # a UsageError: one line on stderr
    if not torch.cuda.is_available():
        assert main(["bench", "speed", "--preset", "gpu", "--out", str(tmp_path / "gpu")]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_render_empty_folder(tmp_path: Path) -> None:
    html, markdown = render_speed_section(tmp_path)
    assert "no speed results" in html and "no speed results" in markdown


def test_gpu_check_script_quick_mode_on_cpu(tmp_path: Path) -> None:
    """scripts/gpu_check.sh --device cpu --quick: the GPU script's code paths at tiny sizes."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick",
                             "--only", "softmax", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS  softmax" in result.stdout and "FAIL" not in result.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["complete"] is True  # (partial outputs are rewritten after every row)
    checks = {(r["name"], r["mode"], r["check"].split(" N=")[0]) for r in report["correctness"] if r["ok"]}
    for mode in ("causal", "bidirectional"):
        for check in ("float32 fwd", "float32 grad", "bf16 fwd"):
            assert ("softmax", mode, check) in checks
    assert {r["name"] for r in report["correctness"]} == {"softmax"}  # --only
    timed = {(r["label"], r["N"]): r for r in report["timings"]}
    for label in ("softmax auto", "softmax SDPA[flash]", "softmax SDPA[default]", "linear auto (elu+1, normalized)"):
        for N in (64, 128):
            row = timed[(label, N)]
            assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and row["rel_err"] < 1e-5, row
            assert row["B"] == 256 // N
    assert "No viable backend" in timed[("softmax SDPA[cudnn]", 64)]["error"]  # no cuDNN on a CPU: recorded
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| implementation | N | B | fwd ms | fwd+bwd ms |" in table and "| softmax auto | 64 | 4 |" in table


def test_gpu_check_ratios_to_the_anchor_table(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_check", root / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    shape = gpu_check.Shape(torch.float32, 1, 8, 1024, (1024,), 0)
    entry = next(e for e in gpu_check.entries(shape, torch.device("cpu")) if e.label == "softmax SDPA[flash]")
    row = gpu_check.time_entry(entry, 1024, shape, torch.device("cpu"), quick=True)
    assert row["anchor"] == "SDPA FlashAttention-2" and row["anchor_fwd_ms"] == 1.033
    assert row["fwd_ratio"] == pytest.approx(row["fwd_ms"] / 1.033)
    assert row["fwdbwd_ratio"] == pytest.approx(row["fwdbwd_ms"] / 4.940)
    assert "rel_err" not in row  # above err_max_length: no reference computed
    assert "| softmax SDPA[flash] | 1024 | 1 |" in gpu_check.table([row])


def test_fla_baselines_are_wired_in_fla_layout_and_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fla builders (GPU only in real runs) against a stand-in module with fla's calling convention:
    [B, T, H, D] inputs, ``g_gamma`` = log of the per-step decay; the output must equal attnlab's lightning."""
    import sys
    import types

    from attnlab.ops import lightning_attention_reference, lightning_decay_slopes

    def chunk_simple_gla(q, k, v, g_gamma=None, scale=None, initial_state=None, output_final_state=False):
        assert q.is_contiguous() and q.shape[2] == 3  # token-major [B, T, H, D]
        out = lightning_attention_reference(*(x.transpose(1, 2) for x in (q, k, v)), decay=-g_gamma, scale=scale)
        return out.transpose(1, 2), None

    def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True):
        assert not normalize
        out = lightning_attention_reference(*(x.transpose(1, 2) for x in (q, k, v)), decay=None, scale=scale)
        return out.transpose(1, 2), None

    fla = types.ModuleType("fla")
    ops = types.ModuleType("fla.ops")
    sg = types.ModuleType("fla.ops.simple_gla")
    la = types.ModuleType("fla.ops.linear_attn")
    sg.chunk_simple_gla, la.chunk_linear_attn = chunk_simple_gla, chunk_linear_attn
    for name, module in (("fla", fla), ("fla.ops", ops), ("fla.ops.simple_gla", sg), ("fla.ops.linear_attn", la)):
        monkeypatch.setitem(sys.modules, name, module)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ctx = {"batch": 2, "heads": 3, "N": 20, "dim": 8, "device": torch.device("cpu"), "dtype": torch.float64}
    expected = lightning_attention_reference(q, k, v, decay=lightning_decay_slopes(3).double(), scale=1.0)
    got = externals._fla_simple_gla(q, k, v, True, ctx)()
    assert torch.allclose(got, expected, atol=1e-10)
    assert torch.allclose(externals._fla_linear_attn(q, k, v, True, ctx)(),
                          lightning_attention_reference(q, k, v, decay=None, scale=1.0), atol=1e-10)
    # forward + backward through the external path: gradients land on (and are cleared from) its leaves
    spec = cells.cell_spec(mechanism="fla:chunk_simple_gla", impl="external", path="external", N=20,
                            mode="fwdbwd", causal=True, batch=2, heads=3, dim=8, dtype="float32", device="cpu",
                            seed=0)
    call = cells.build_cell(spec)
    call()
    call()


def test_markdown_to_html_covers_what_both_reports_write() -> None:
    from attnlab.bench.markdown_html import markdown_to_html

    text = "\n".join(["# dropped title", "## mqar (L32)", "Settings: a < b.", "**Time per call (ms)**", "",
                      "| name | N=1 |", "|---|---:|", "| softmax | 1.5 (x1.00) |", "- linear: skipped"])
    assert markdown_to_html(text, table_class="speed").splitlines() == [
        "<h2>mqar (L32)</h2>", "<p>Settings: a &lt; b.</p>", "<h4>Time per call (ms)</h4>",
        '<table class="speed"><tr><th>name</th><th>N=1</th></tr><tr><td>softmax</td><td>1.5 (x1.00)</td></tr></table>',
        '<div class="note">linear: skipped</div>']
    assert markdown_to_html("| a |\n|---|\n| 1 |").startswith("<table><tr><th>a</th>")


def test_a_second_sweep_into_a_folder_being_written_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from attnlab.cli_errors import UsageError

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from attnlab.bench.results import exclusive_writer\n"
        "with exclusive_writer(sys.argv[1]):\n"
        "    Path(sys.argv[1], 'holding').write_text('1')\n"
        "    while not Path(sys.argv[1], 'release').exists(): time.sleep(0.02)\n"), str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "holding").exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(UsageError, match=f"pid {holder.pid}.*wait for it to finish or choose another --out"):
            speed.run_speed_benchmark(preset="smoke", out_dir=tmp_path, mechanisms="softmax", say=lambda line: None)
        assert not (tmp_path / speed_config.RESULTS_FILE).exists()
    finally:
        (tmp_path / "release").write_text("1")
        holder.wait(timeout=60)


def test_a_spent_time_budget_leaves_the_rest_for_a_rerun(tmp_path: Path) -> None:
    kwargs = dict(preset="smoke", out_dir=tmp_path, mechanisms="softmax,linear", lengths=(32, 64),
                  say=lambda line: None)
    rows = speed.run_speed_benchmark(max_total_seconds=0.0, **kwargs)  # spent before the first cell
    assert {r["status"] for r in rows} == {"skipped"}
    assert all(r["reason"].startswith("time budget: the sweep's 0 s were spent") for r in rows)
    assert "not run (time budget)" in (tmp_path / "speed.md").read_text()
    rows = speed.run_speed_benchmark(**kwargs)  # the rerun measures what the budget left out
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 4
    # a cell past the length cap says so, budget or not
    rows = speed.run_speed_benchmark(max_total_seconds=0.0, length_cap=32, length_cap_exempt=("softmax",),
                                     **{**kwargs, "out_dir": tmp_path / "capped"})
    reasons = {(r["mechanism"], r["N"]): r["reason"].split(":")[0] for r in rows}
    assert reasons == {("softmax", 32): "time budget", ("softmax", 64): "time budget",
                       ("linear", 32): "time budget", ("linear", 64): "length cap"}
