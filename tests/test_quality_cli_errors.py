"""Bad invocations of ``attnlab bench quality`` and ``attnlab demo``: exit 2, one line on stderr naming the
option, no traceback, nothing trained; incompatible pairs are skipped with their reason unless --strict."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.bench.results import load_results
from attnlab.cli import main
from attnlab.registry import _REGISTRY

SMOKE = ["--preset", "smoke", "--tasks", "mqar", "--no-progress"]

# (id, arguments after "bench quality" with OUT for the run folder, the option the message must name)
BAD_QUALITY = [
    ("empty-mechanisms", [*SMOKE, "--mechanisms", "", "--out", "OUT"], "--mechanisms"),
    ("blank-mechanisms", [*SMOKE, "--mechanisms", " , ", "--out", "OUT"], "--mechanisms"),
    ("unknown-mechanism", [*SMOKE, "--mechanisms", "sofmax", "--out", "OUT"], "--mechanisms"),
    ("threads-0", [*SMOKE, "--threads", "0", "--out", "OUT"], "--threads"),
    ("workers-0", [*SMOKE, "--workers", "0", "--out", "OUT"], "--workers"),
    ("workers-negative", [*SMOKE, "--workers", "-3", "--out", "OUT"], "--workers"),
    ("seeds-0", [*SMOKE, "--seeds", "0", "--out", "OUT"], "--seeds"),
    ("nproc-0", [*SMOKE, "--nproc", "0", "--out", "OUT"], "--nproc"),
    ("workers-with-nproc", [*SMOKE, "--workers", "2", "--nproc", "2", "--out", "OUT"], "--workers"),
    ("out-is-a-file", [*SMOKE, "--out", "FILE"], "--out"),
    ("no-out", [*SMOKE], "--out"),
    ("cuda-without-cuda", [*SMOKE, "--device", "cuda", "--out", "OUT"], "--device"),
    ("not-a-device", [*SMOKE, "--device", "gpu0", "--out", "OUT"], "--device"),
    ("unknown-preset", ["--preset", "smok", "--tasks", "mqar", "--out", "OUT"], "--preset"),
    ("unknown-task", ["--preset", "smoke", "--tasks", "mqr", "--out", "OUT"], "--tasks"),
    ("no-task", ["--preset", "smoke", "--tasks", ",", "--out", "OUT"], "--tasks"),
    ("unknown-variant", [*SMOKE, "--variants", "V1-L2", "--out", "OUT"], "--variants"),
    ("steps-0", [*SMOKE, "--steps", "0", "--out", "OUT"], "--steps"),
    ("unknown-mechanism-option", [*SMOKE, "--mechanisms", "linear:window=4", "--out", "OUT"], "--mechanisms"),
    ("option-without-value", [*SMOKE, "--mechanisms", "linear:feature_map", "--out", "OUT"], "--mechanisms"),
    ("option-twice", [*SMOKE, "--mechanisms", "sliding_window:window=4:window=8", "--out", "OUT"], "--mechanisms"),
    ("options-without-name", [*SMOKE, "--mechanisms", ":window=4", "--out", "OUT"], "--mechanisms"),
    ("same-spec-twice", [*SMOKE, "--mechanisms", "linear:feature_dim=4:eps=0.001,linear:eps=1e-3:feature_dim=4",
                         "--out", "OUT"], "--mechanisms"),
]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU build, whatever this machine has: ``--device cuda`` must be refused before anything runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("arguments", "option"), [pytest.param(a, o, id=i) for i, a, o in BAD_QUALITY])
def test_bad_bench_quality_invocations_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           no_cuda: None, arguments: list[str], option: str) -> None:
    out, file = tmp_path / "run", tmp_path / "a-file"
    file.write_text("not a folder\n")
    argv = ["bench", "quality", *[str(out) if a == "OUT" else str(file) if a == "FILE" else a for a in arguments]]
    code, printed, err = _run(argv, capsys)
    assert code == 2, (printed, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], err
    assert "Traceback" not in err + printed
    assert not (out / "results.jsonl").exists() and file.read_text() == "not a folder\n"


@pytest.mark.parametrize(("arguments", "option"), [
    pytest.param(["--workers", "0", "--preset", "smoke", "--out", "OUT"], "--workers", id="workers-0"),
    pytest.param(["--preset", "smok", "--out", "OUT"], "--preset", id="unknown-preset"),
])
def test_bad_demo_invocations_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   arguments: list[str], option: str) -> None:
    out = tmp_path / "demo"
    code, printed, err = _run(["demo", *[str(out) if a == "OUT" else a for a in arguments]], capsys)
    assert code == 2, (printed, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], err
    assert "Traceback" not in err + printed
    assert not (out / "results.jsonl").exists()


@pytest.fixture
def bidirectional_only(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered mechanism without a causal form: it cannot run MQAR (a decoder)."""
    softmax = attnlab.get("softmax")
    monkeypatch.setitem(_REGISTRY, "bidirectional_only",
                        dataclasses.replace(softmax, name="bidirectional_only", supports_causal=False))
    return "bidirectional_only"


def test_an_incompatible_pair_is_skipped_with_its_reason_and_the_rest_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], bidirectional_only: str) -> None:
    out = tmp_path / "run"
    argv = ["bench", "quality", *SMOKE, "--mechanisms", f"softmax,{bidirectional_only}", "--workers", "1",
            "--out", str(out)]
    code, printed, err = _run([*argv, "--strict"], capsys)
    assert code == 2 and "refused before training" in err and len(err.strip().splitlines()) == 1
    assert f"{bidirectional_only} on mqar" in err and not (out / "results.jsonl").exists()

    code, printed, err = _run(argv, capsys)
    assert code == 0, err
    assert f"skipped {bidirectional_only} on mqar: mechanism '{bidirectional_only}' defines no causal form" in printed
    assert [(r["mechanism"], r["status"]) for r in load_results(out / "results.jsonl")] == [("softmax", "ok")]


def test_mechanisms_all_names_each_mechanism_left_out_and_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], bidirectional_only: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # keep the run short: the registry reduced to softmax, lightning and the bidirectional-only one
    for name in [n for n in _REGISTRY if n not in ("softmax", "lightning", bidirectional_only)]:
        monkeypatch.delitem(_REGISTRY, name)
    out = tmp_path / "run"
    code, printed, err = _run(["bench", "quality", *SMOKE, "--mechanisms", "all", "--workers", "1",
                               "--out", str(out)], capsys)
    assert code == 0, err
    left_out = [line.rstrip() for line in printed.splitlines() if line.startswith("--mechanisms all: left out")]
    assert left_out == [f"--mechanisms all: left out {bidirectional_only} on mqar: mechanism "
                        f"'{bidirectional_only}' defines no causal form, and this model is causal (a decoder)"]
    assert "--mechanisms all: mqar: 2 of 3 registered mechanisms fit (1 left out)" in printed
    assert sorted(r["mechanism"] for r in load_results(out / "results.jsonl")) == ["lightning", "softmax"]


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    texts = {}
    for command in (["bench", "quality"], ["demo"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        texts[command[0]] = " ".join(capsys.readouterr().out.split())
    for text in texts.values():
        assert "--workers N" in text and "(None: the cores this process may use)" in text
        assert "(default: quick)" in text
    assert "(default: softmax)" in texts["bench"] and "(default: 1)" in texts["bench"]
    assert "--ray [ADDRESS]" in texts["bench"] and "(None: no Ray)" in texts["bench"]


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom attnlab.bench.results import exclusive_writer\n"
         "with exclusive_writer(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, printed, err = _run(["bench", "quality", *SMOKE, "--mechanisms", "softmax", "--workers", "2",
                                   "--seeds", "2", "--out", str(out)], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, (printed, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"--out {out} is being written by another attnlab run (pid {holder.pid}," in lines[0]
    assert not (out / "results.jsonl").exists()
