"""Parallel runs of the quality benchmark: ``--workers N`` (worker processes) and ``--ray`` give the same
records as one process, a run that raises is recorded as failed without stopping the others, and
Ctrl-C stops everything with the "saved / resume" message; the rerun completes without duplicates."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import attnlab
from attnlab.bench.presets import get_preset
from attnlab.bench.quality import pending_jobs, plan_jobs, run_quality
from attnlab.bench.quality_jobs import RESULT_KEY, Job
from attnlab.bench.results import load_results, result_key
from attnlab.bench.runner import Recorder, run_in_workers
from attnlab.cli import main
from attnlab.registry import _REGISTRY

# what must not depend on scheduling: every number a run produces
COMPARED = ("value", "metrics", "loss_curve", "parameters", "state_size", "steps")
SMOKE_PLAN = ["--preset", "smoke", "--tasks", "mqar,incontext_regression", "--mechanisms", "softmax,lightning",
              "--seeds", "2", "--no-progress"]


def _by_key(records: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    keyed = {result_key(r, RESULT_KEY): r for r in records}
    assert len(keyed) == len(records), "a key appears twice"
    return keyed


def test_two_workers_give_the_same_metrics_as_one(tmp_path: Path) -> None:
    assert main(["bench", "quality", *SMOKE_PLAN, "--workers", "1", "--out", str(tmp_path / "one")]) == 0
    assert main(["bench", "quality", *SMOKE_PLAN, "--workers", "2", "--out", str(tmp_path / "two")]) == 0
    one = _by_key(load_results(tmp_path / "one" / "results.jsonl"))
    two = _by_key(load_results(tmp_path / "two" / "results.jsonl"))
    assert len(one) == 8 and one.keys() == two.keys()
    for key, record in one.items():
        assert record["status"] == two[key]["status"] == "ok"
        for field in COMPARED:
            assert two[key][field] == record[field], (key, field)


def test_a_run_that_raises_in_a_worker_is_recorded_as_failed_and_the_others_finish(tmp_path: Path) -> None:
    config = get_preset("smoke").tasks["mqar"][0]
    bad = Job("mqar", "softmax", 1, dataclasses.replace(config, num_pairs=50), "smoke")  # 50 pairs in 16 tokens
    jobs = [Job("mqar", "softmax", 0, config, "smoke"), bad, Job("mqar", "lightning", 0, config, "smoke")]
    path = tmp_path / "results.jsonl"
    written = run_in_workers(jobs, workers=2, recorder=Recorder(path, planned=3, done_before=0), progress=False)
    records = load_results(path)
    assert len(written) == len(records) == 3
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["seed"] == 1 and failed[0]["config"]["num_pairs"] == 50
    assert failed[0]["error"].startswith("ValueError: num_pairs=50")
    assert sorted(r["mechanism"] for r in records if r["status"] == "ok") == ["lightning", "softmax"]
    # a failed run is not complete: a rerun trains it again
    assert pending_jobs(jobs, path) == [bad]


@pytest.fixture
def fails_in_training(monkeypatch: pytest.MonkeyPatch) -> str:
    """A mechanism that passes the pre-training probe (2 sequences) but raises on a training batch."""
    softmax = attnlab.get("softmax")

    def op(q, k, v, *, causal=False, scale=None):
        if q.shape[0] > 2:
            raise RuntimeError(f"batch of {q.shape[0]} sequences")
        return softmax.op(q, k, v, causal=causal, scale=scale)

    monkeypatch.setitem(_REGISTRY, "fails_in_training", dataclasses.replace(softmax, name="fails_in_training", op=op))
    return "fails_in_training"


def test_a_failed_run_in_the_sequential_path_is_recorded_and_the_command_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fails_in_training: str) -> None:
    out = tmp_path / "run"
    args = ["bench", "quality", "--preset", "smoke", "--tasks", "mqar", "--mechanisms", f"softmax,{fails_in_training}",
            "--workers", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "1 run(s) failed: mqar" in printed and f"{fails_in_training} seed 0 (RuntimeError: batch of 16" in printed
    records = load_results(out / "results.jsonl")
    assert sorted((r["mechanism"], r["status"]) for r in records) == [(fails_in_training, "failed"), ("softmax", "ok")]
    results = run_quality(tasks=["mqar"], mechanisms=["softmax", fails_in_training], preset="smoke", out_dir=out,
                          progress=False)
    assert [r["mechanism"] for r in results] == ["softmax"]
    assert [r["mechanism"] for r in results.failed] == [fails_in_training]
    assert len(load_results(out / "results.jsonl")) == 3  # the failed run was retried (and failed again)


def _start(out: Path, workers: int, seeds: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "attnlab.cli", "bench", "quality", "--preset", "smoke", "--tasks", "mqar",
               "--mechanisms", "softmax,lightning", "--seeds", str(seeds), "--workers", str(workers),
               "--out", str(out), "--no-progress"]
    # a session of its own: SIGINT goes to the whole process group, as Ctrl-C in a terminal does
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("workers", [1, 2], ids=["sequential", "2-workers"])
def test_ctrl_c_saves_what_finished_and_the_rerun_completes_without_duplicates(tmp_path: Path, workers: int) -> None:
    out, seeds = tmp_path / "run", 8
    process = _start(out, workers, seeds)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be interrupted: make the plan longer"
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    saved = len(load_results(results))
    assert process.returncode == 130, err
    assert err.strip().splitlines() == [f"interrupted; {saved} of {2 * seeds} runs saved in {results}; "
                                        f"rerun the same command to resume"]
    assert 1 <= saved < 2 * seeds
    rerun = _start(out, workers, seeds)
    out_text, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"{saved} already in" in out_text
    records = load_results(results)
    jobs = plan_jobs(["mqar"], ["softmax", "lightning"], get_preset("smoke"), seeds)
    assert sorted(_by_key(records)) == sorted(result_key(j.key_record(), RESULT_KEY) for j in jobs)
    assert all(r["status"] == "ok" for r in records)


@pytest.mark.ray
def test_ray_on_a_local_instance_gives_the_same_metrics_as_one_process(tmp_path: Path) -> None:
    plan: dict[str, Any] = {"tasks": ["mqar", "incontext_regression"], "mechanisms": ["softmax", "lightning"],
                            "preset": "smoke", "seeds": 2, "progress": False}
    one = _by_key(run_quality(**plan, out_dir=tmp_path / "one", workers=1))
    on_ray = _by_key(run_quality(**plan, out_dir=tmp_path / "ray", workers=2, ray="local"))
    assert len(one) == 8 and one.keys() == on_ray.keys()
    for key, record in one.items():
        for field in COMPARED:
            assert on_ray[key][field] == record[field], (key, field)
    lines = [json.loads(line) for line in (tmp_path / "ray" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(r["status"] == "ok" for r in lines)


def test_a_worker_killed_mid_run_fails_that_run_and_a_new_worker_trains_the_rest(tmp_path: Path) -> None:
    config = get_preset("smoke").tasks["mqar"][0]
    long_run = Job("mqar", "softmax", 0, dataclasses.replace(config, steps=5000), "smoke")
    jobs = [long_run, Job("mqar", "softmax", 1, config, "smoke")]
    killed: list[int] = []

    def kill_the_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            workers = [p for p in multiprocessing.active_children() if p.name.startswith("attnlab-worker")]
            if workers and workers[0].pid:
                time.sleep(0.5)
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    path = tmp_path / "results.jsonl"
    run_in_workers(jobs, workers=1, recorder=Recorder(path, planned=2, done_before=0), progress=False)
    killer.join()
    assert killed
    records = {r["seed"]: r for r in load_results(path)}
    assert records[0]["status"] == "failed" and records[0]["error"].startswith("WorkerDied: ")
    assert "-9" in records[0]["error"] and records[1]["status"] == "ok"


def test_ray_without_the_extra_is_one_clear_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attnlab.cli_errors import UsageError

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is not installed
    with pytest.raises(UsageError, match=r"--ray needs Ray, which is not installed: pip install 'attnlab\[ray\]'"):
        run_quality(tasks=["mqar"], mechanisms=["softmax"], preset="smoke", seeds=2, out_dir=tmp_path, ray="local",
                    progress=False)
    assert not (tmp_path / "results.jsonl").exists()
