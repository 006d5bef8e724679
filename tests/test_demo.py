"""``attnlab demo --preset smoke``: a real run over at least 8 registered mechanisms, the leaderboard, the report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import attnlab
from attnlab.bench.demo import PREFERRED_MECHANISMS
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
    assert all(r["preset"] == "smoke" and r["steps"] > 0 for r in records)
    assert (out / "report.html").exists() and (out / "leaderboard.md").exists()
    assert f"report: {out / 'report.html'}" in printed
    # preferred mechanisms come first: each task's list starts with softmax
    for task in ("mqar", "incontext_regression", "digits"):
        line = re.search(rf"^\s+{task} runs: (.*)$", printed, flags=re.MULTILINE)
        assert line is not None and line.group(1).split(", ")[0] == PREFERRED_MECHANISMS[0]


def test_demo_refuses_a_folder_that_already_holds_results(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"task": "mqar"}\n')
    assert main(["demo", "--preset", "smoke", "--out", str(tmp_path)]) == 2
