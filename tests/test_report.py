"""The report: mean +- std over seeds, ordering, a self-contained HTML file, the speed section."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest

from attnlab.bench.report import aggregate, leaderboard_markdown, state_size_of, write_report
from attnlab.bench.results import append_result
from attnlab.cli import main


def _record(task: str, mechanism: str, seed: int, value: float, *, metric: str = "accuracy", higher: bool = True,
            state: int | None = None) -> dict:
    return {"task": task, "mechanism": mechanism, "seed": seed, "config": {"seq_len": 32, "dim": 16, "depth": 2,
                                                                           "steps": 10},
            "config_label": "L32", "metric": metric, "higher_is_better": higher, "value": value,
            "metrics": {metric: value}, "loss_curve": [[5, 2.0 - 0.1 * seed], [10, 1.0 + 0.2 * value]],
            "parameters": 1234, "state_size": state, "family": "f", "wall_time_s": 1.5, "versions": {"torch": "x"}}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    for record in (_record("mqar", "softmax", 0, 0.5), _record("mqar", "softmax", 1, 0.7),
                   _record("mqar", "lightning", 0, 0.9, state=512), _record("mqar", "lightning", 1, 0.8, state=512),
                   _record("wikitext", "softmax", 0, 2.5, metric="bits_per_byte", higher=False),
                   _record("wikitext", "lightning", 0, 2.1, metric="bits_per_byte", higher=False)):
        append_result(tmp_path / "results.jsonl", record)
    return tmp_path


def test_aggregate_gives_mean_and_sample_std_and_orders_best_first(run_dir: Path) -> None:
    from attnlab.bench.results import load_results

    rows = aggregate(load_results(run_dir / "results.jsonl"))
    mqar = [r for r in rows if r.task == "mqar"]
    assert [r.mechanism for r in mqar] == ["lightning", "softmax"]
    assert mqar[1].mean == pytest.approx(0.6) and mqar[1].std == pytest.approx(math.sqrt(0.02))
    assert mqar[0].mean == pytest.approx(0.85) and mqar[0].std == pytest.approx(math.sqrt(0.005))
    wiki = [r for r in rows if r.task == "wikitext"]
    assert [r.mechanism for r in wiki] == ["lightning", "softmax"]  # lower bits per byte first
    markdown = leaderboard_markdown(rows)
    assert "| 1 | lightning | f | 0.8500 ± 0.0707 | 2 |" in markdown
    assert "| 2 | softmax | f | 0.6000 ± 0.1414 | 2 |" in markdown
    assert "lower is better" in markdown and "higher is better" in markdown


def test_state_size_falls_back_to_the_kv_cache() -> None:
    assert state_size_of(_record("mqar", "softmax", 0, 0.5)) == (2 * 32 * 16 * 2, "kv-cache")
    assert state_size_of(_record("mqar", "lightning", 0, 0.5, state=77)) == (77.0, "recurrent")


def test_report_is_self_contained_with_plots(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_dir)]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # two metric plots, accuracy vs state size, loss curves
    assert "src='http" not in html and "<link" not in html and "<script" not in html
    assert "lightning" in html and "0.8500 ± 0.0707" in html
    assert (run_dir / "leaderboard.md").read_text().startswith("# attnlab report")


def test_speed_results_in_the_folder_are_included(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (run_dir / "speed.jsonl").write_text('{"op": "softmax"}\n')
    module = types.ModuleType("attnlab.bench.speed_report")
    module.render_speed_section = lambda folder: (f"<table><tr><td>speed of {Path(folder).name}</td></tr></table>",
                                                  "| speed table |")
    monkeypatch.setitem(sys.modules, "attnlab.bench.speed_report", module)
    report, leaderboard = write_report(run_dir)
    assert f"speed of {run_dir.name}" in report.read_text()
    assert "| speed table |" in leaderboard.read_text()


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results.jsonl or speed.jsonl"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
