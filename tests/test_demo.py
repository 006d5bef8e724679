"""``attnlab demo --preset smoke``: a real run over at least 8 registered mechanisms, the leaderboard, the report."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import attnlab
from attnlab.bench.demo import DEMO_SEEDS, PREFERRED_MECHANISMS
from attnlab.bench.results import load_results
from attnlab.cli import main


def test_demo_smoke_runs_at_least_eight_mechanisms_and_writes_the_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ran = re.search(r"mechanisms run \((\d+)\): (.*)", printed)
    assert ran is not None
    names = [n.strip() for n in ran.group(2).split(",")]
    assert int(ran.group(1)) == len(names) >= 8
    registered = {m.name for m in attnlab.mechanisms()}
    assert set(names) <= registered and "softmax" in names
    records = load_results(out / "results.jsonl")
    assert {r["task"] for r in records} == {"mqar", "incontext_regression", "digits"}
    assert {r["mechanism"] for r in records} == set(names)
    assert all(r["preset"] == "smoke" and r["steps"] > 0 and r["status"] == "ok" for r in records)
    # every (task, mechanism) trained DEMO_SEEDS seeds, 0 .. DEMO_SEEDS - 1, once each
    seeds = Counter((r["task"], r["mechanism"], r["seed"]) for r in records)
    assert set(seeds.values()) == {1} and {s for _, _, s in seeds} == set(range(DEMO_SEEDS))
    assert len(seeds) == DEMO_SEEDS * len({(t, m) for t, m, _ in seeds})
    assert re.search(rf"total time \d+ s wall \(\d+ worker\(s\), {DEMO_SEEDS} seed\(s\)", printed)
    assert (out / "report.html").exists() and (out / "leaderboard.md").exists()
    assert f"report: {out / 'report.html'}" in printed
    # preferred mechanisms come first: each task's list starts with softmax
    for task in ("mqar", "incontext_regression", "digits"):
        line = re.search(rf"^\s+{task} runs: (.*)$", printed, flags=re.MULTILINE)
        assert line is not None and line.group(1).split(", ")[0] == PREFERRED_MECHANISMS[0]


def test_demo_refuses_a_folder_that_already_holds_results(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.jsonl").write_text('{"task": "mqar"}\n')
    assert main(["demo", "--preset", "smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {tmp_path} already holds results" in err[0]
    assert (tmp_path / "results.jsonl").read_text() == '{"task": "mqar"}\n'  # untouched


def test_ctrl_c_during_the_demo_says_what_was_saved_and_how_to_carry_on(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    process = subprocess.Popen([sys.executable, "-m", "attnlab.cli", "demo", "--preset", "smoke", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and not (results.exists() and results.stat().st_size):
        time.sleep(0.02)
    assert process.poll() is None, "the demo ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    saved = len(load_results(results))
    assert re.fullmatch(rf"interrupted; {saved} of \d+ runs saved in {re.escape(str(results))}; "
                        rf"`attnlab report {re.escape(str(out))}` shows them; `attnlab demo` starts afresh in a new "
                        rf"folder", err.strip()), err
