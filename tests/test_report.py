"""The report: statistics over seeds, the learning rate chosen on validation, ranks, failed runs, non-finite
metrics, a self-contained HTML file, the speed section, and `attnlab report` on each kind of folder."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest

from attnlab.bench.report import (
    ONE_RATE_NOTE,
    aggregate,
    leaderboard_markdown,
    ranks,
    state_size_of,
    t_quantile_975,
    value_text,
    write_report,
)
from attnlab.bench.results import append_result, load_results
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
    digits = {"task": "digits", "config": {"patch_size": 2, "dim": 32, "depth": 2}}  # 8x8 image: 16 patches
    assert state_size_of(digits) == (2 * 16 * 32 * 2, "kv-cache")
    local = {**_record("mqar", "sliding_window", 0, 0.5), "mixer_options": {"window": 8, "sink_tokens": 4}}
    assert state_size_of(local) == (2 * 12 * 16 * 2, "kv-cache")  # 8 recent keys and 4 sinks per layer


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
    with pytest.raises(FileNotFoundError, match=r"no quality results \(results.jsonl\) or speed.jsonl"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2


def _run(mechanism: str, seed: int, lr: float, test: float, validation: float | None = None, *,
         higher: bool = True, sweep: tuple[float, ...] = (1e-3, 3e-3, 1e-2), status: str | None = None,
         error: str | None = None, task: str = "mqar", finished: str = "2026-01-01T00:00:00") -> dict:
    record = {"task": task, "mechanism": mechanism, "seed": seed, "lr": lr, "sweep": list(sweep),
              "config": {"seq_len": 32, "dim": 16, "lr": lr}, "config_label": "L32", "metric": "accuracy",
              "higher_is_better": higher, "family": "f", "parameters": 10, "wall_time_s": 1.0, "finished": finished}
    if status != "failed":
        record |= {"value": test, "metrics": {"accuracy": test}, "train_step_s": 0.01}
        if validation is not None:
            record |= {"validation_value": validation, "validation_metrics": {"accuracy": validation}}
    if status is not None:
        record["status"] = status
    if error is not None:
        record["error"] = error
    return record


def test_the_rate_with_the_best_mean_validation_value_is_chosen_and_its_test_metric_reported() -> None:
    records = [
        # 1e-3 has the best TEST values but a worse validation mean: it must not be chosen
        _run("softmax", 0, 1e-3, test=0.99, validation=0.50), _run("softmax", 1, 1e-3, test=0.98, validation=0.60),
        _run("softmax", 0, 3e-3, test=0.70, validation=0.90), _run("softmax", 1, 3e-3, test=0.80, validation=0.80),
        # 1e-2 has the best single validation value, but a NaN seed: NaN is the worst
        _run("softmax", 0, 1e-2, test=0.95, validation=1.00), _run("softmax", 1, 1e-2, test=0.95,
                                                                    validation=math.nan),
    ]
    (row,) = aggregate(records)
    assert row.lr == 3e-3 and row.values == [0.70, 0.80] and row.seeds == [0, 1]
    assert row.validation_mean == pytest.approx(0.85) and row.rates_run == [1e-3, 3e-3, 1e-2]
    markdown = leaderboard_markdown([row])
    assert "| 1 | softmax | f | 0.7500 ± 0.0707 | 2 | 0.003 |" in markdown
    assert "swept over 0.001, 0.003, 0.01" in markdown and ONE_RATE_NOTE not in markdown
    assert "## mqar (L32): learning rate swept\n" in markdown
    assert "Not every row tried every rate" not in markdown
    # rows that tried different rates say which (a partial sweep must not read as the full one)
    partial = leaderboard_markdown(aggregate(records + [_run("linear", 0, 1e-3, test=0.2, validation=0.2),
                                                        _run("linear", 0, 3e-3, test=0.3, validation=0.3)]))
    assert "Not every row tried every rate: softmax: 0.001, 0.003, 0.01; linear: 0.001, 0.003." in partial
    # a second seed added at one rate only: rates are compared on the seed they share (seed 0), and the
    # row then reports both seeds of the chosen rate
    extra = [_run("gla", 0, 3e-3, test=0.95, validation=0.96), _run("gla", 0, 1e-2, test=0.99, validation=0.99),
             _run("gla", 1, 1e-2, test=0.90, validation=0.90)]
    (chosen,) = aggregate(extra)
    assert chosen.lr == 1e-2 and chosen.values == [0.99, 0.90] and "seeds all of them ran (0)" in chosen.lr_choice
    # lower is better: the smallest validation mean wins
    low = [_run("linear", 0, 1e-3, test=2.0, validation=3.0, higher=False),
           _run("linear", 0, 3e-3, test=2.5, validation=1.0, higher=False)]
    assert aggregate(low)[0].lr == 3e-3 and aggregate(low)[0].values == [2.5]
    # a rate where a seed failed counts as the worst, even with a better mean among its finished seeds
    failing = [_run("tnl", 0, 1e-3, test=0.5, validation=0.5), _run("tnl", 1, 1e-3, test=0.5, validation=0.5),
               _run("tnl", 0, 3e-3, test=0.9, validation=0.9),
               _run("tnl", 1, 3e-3, test=0.0, status="failed", error="RuntimeError: diverged")]
    assert aggregate(failing)[0].lr == 1e-3


def test_one_rate_says_not_swept_and_one_seed_prints_no_spread() -> None:
    rows = aggregate([_run("softmax", 0, 3e-3, test=0.5, sweep=(3e-3,)),  # old-style: no validation value
                      _run("lightning", 0, 3e-3, test=0.25, validation=0.2, sweep=(3e-3,))])
    markdown = leaderboard_markdown(rows)
    assert f"## mqar (L32): {ONE_RATE_NOTE}\n" in markdown
    assert f"Learning rate: {ONE_RATE_NOTE} (0.003)." in markdown
    assert "| 1 | softmax | f | 0.5000 | 1 | 0.003 |" in markdown
    assert "| 2 | lightning | f | 0.2500 | 1 | 0.003 |" in markdown
    assert "±" not in markdown and "One seed per row" in markdown and "mean ± " not in markdown.lower()


def test_records_without_validation_at_several_rates_show_every_rate() -> None:
    rows = aggregate([_run("softmax", 0, 1e-3, test=0.4), _run("softmax", 0, 3e-3, test=0.6)])
    assert sorted(r.mechanism for r in rows) == ["softmax (lr 0.001)", "softmax (lr 0.003)"]
    assert {r.lr_choice for r in rows} == {"no validation values: every rate shown"}


def test_non_finite_metrics_never_crash_say_so_and_rank_last(tmp_path: Path) -> None:
    records = [_run("softmax", s, 3e-3, test=v, validation=0.5, sweep=(3e-3,)) for s, v in enumerate((0.5, 0.6))]
    records += [_run("flow", 0, 3e-3, test=math.inf, validation=0.5, sweep=(3e-3,)),
                _run("flow", 1, 3e-3, test=0.9, validation=0.5, sweep=(3e-3,)),
                _run("flow", 2, 3e-3, test=0.95, validation=0.5, sweep=(3e-3,)),
                _run("agent", 0, 3e-3, test=math.nan, validation=0.5, sweep=(3e-3,)),
                _run("agent", 1, 3e-3, test=-math.inf, validation=0.5, sweep=(3e-3,))]
    rows = aggregate(records)
    assert [r.mechanism for r in rows][0] == "softmax"
    texts = {r.mechanism: value_text(r) for r in rows}
    assert texts["flow"] == "inf in 1 of 3 seeds" and texts["agent"] == "non-finite value in 2 of 2 seeds"
    assert ranks(rows) == ["1", "2", "2"]
    for record in records:
        append_result(tmp_path / "results.jsonl", record)
    report, leaderboard = write_report(tmp_path)
    assert "inf in 1 of 3 seeds" in leaderboard.read_text() and "data:image/png" in report.read_text()


def test_ties_share_a_rank() -> None:
    values = {"a": 0.9, "b": 0.8, "c": 0.8, "d": 0.7, "e": 0.80001}  # e shows as 0.8000 too
    rows = aggregate([_run(m, 0, 3e-3, test=v, validation=v, sweep=(3e-3,)) for m, v in values.items()])
    assert [(r.mechanism, rank) for r, rank in zip(rows, ranks(rows), strict=True)] == [
        ("a", "1"), ("b", "2"), ("c", "2"), ("e", "2"), ("d", "5")]


def test_failed_runs_appear_with_their_error() -> None:
    records = [_run("softmax", 0, 3e-3, test=0.5, validation=0.5, sweep=(3e-3,)),
               _run("softmax", 1, 3e-3, test=0.0, status="failed", error="Traceback...\nValueError: bad",
                    sweep=(3e-3,)),
               _run("hip", 0, 3e-3, test=0.0, status="failed", error="MemoryError: out of memory", sweep=(3e-3,)),
               _run("linear", 0, 3e-3, test=0.1, validation=0.1, status="ok", sweep=(3e-3,))]
    rows = aggregate(records)
    assert [r.mechanism for r in rows] == ["softmax", "linear", "hip"]
    assert ranks(rows) == ["1", "2", "-"]
    markdown = leaderboard_markdown(rows)
    assert "| - | hip | f | failed: MemoryError: out of memory | 0 |" in markdown
    assert "| 1 | softmax | f | 0.5000 (1 more seed failed) | 1 |" in markdown
    assert "- failed: softmax, seed 1: ValueError: bad" in markdown
    # what the runner writes for a run that raised: the job's fields, status and error (no metric, no family)
    runner_record = {"task": "mqar", "mechanism": "agent", "seed": 0, "lr": 3e-3, "sweep": [3e-3],
                     "config": {"seq_len": 32, "dim": 16, "lr": 3e-3}, "config_label": "L32", "status": "failed",
                     "error": "RuntimeError: x", "finished": "2026-01-01T00:00:00"}
    rows = aggregate([*records, runner_record])
    assert len({(r.task, r.config_label) for r in rows}) == 1  # the same table as the runs that finished
    agent = next(r for r in rows if r.mechanism == "agent")
    assert agent.failed and agent.metric == "accuracy" and value_text(agent) == "failed: RuntimeError: x"


def test_a_failed_try_then_a_rerun_counts_once() -> None:
    records = [_run("softmax", 0, 3e-3, test=0.0, status="failed", error="killed", sweep=(3e-3,),
                    finished="2026-01-01T10:00:00"),
               _run("softmax", 0, 3e-3, test=0.6, validation=0.6, sweep=(3e-3,), finished="2026-01-01T11:00:00"),
               _run("softmax", 0, 3e-3, test=0.6, validation=0.6, sweep=(3e-3,), finished="2026-01-01T11:00:00")]
    (row,) = aggregate(records)
    assert row.values == [0.6] and row.failures == []


def test_the_t_interval_uses_students_t_with_n_minus_1_degrees_of_freedom(tmp_path: Path) -> None:
    # textbook values of t(0.975, df)
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match="degrees_of_freedom=0"):
        t_quantile_975(0)
    for seed, value in enumerate((1.0, 2.0, 3.0)):  # mean 2, sample std 1: 2 +- 4.3027 / sqrt(3)
        append_result(tmp_path / "results.jsonl", _run("softmax", seed, 3e-3, test=value, validation=1.0,
                                                       sweep=(3e-3,)))
    append_result(tmp_path / "results.jsonl", _run("linear", 0, 3e-3, test=0.5, validation=1.0, sweep=(3e-3,)))
    report, leaderboard = write_report(tmp_path)
    html = report.read_text()
    assert "<td>[-0.4842, 4.4842]</td>" in html and "Student&#x27;s t" in html
    assert "[-0.4842" not in leaderboard.read_text()  # the interval is in report.html only


def test_report_prints_unreadable_lines_and_duplicates_are_ignored(run_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = run_dir / "results.jsonl"
    first = path.read_text().splitlines()[0]
    with path.open("a") as handle:
        handle.write(first + "\n")  # the same run twice (two writers before the lock existed)
        handle.write('{"task": "mqar", "mechan\n')
    lines = len(path.read_text().splitlines())
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"results.jsonl line {lines}: not a complete JSON object" in out
    html = (run_dir / "report.html").read_text()
    assert "1 duplicate records ignored" in html and f"line {lines}" in html
    assert "| 2 | softmax | f | 0.6000 ± 0.1414 | 2 |" in (run_dir / "leaderboard.md").read_text()


def _analysis_folder(folder: Path) -> None:
    append_result(folder / "results.jsonl", {"metric": "sinks", "model": "minilm", "time": "t",
                                             "share": [[0.25, 0.5], [0.75, 0.125]],
                                             "share_first_token": [[0.5, 0.25], [0.125, 0.75]]})


def test_report_rebuilds_each_kind_and_never_overwrites_another_kind(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    analysis = tmp_path / "analysis"
    _analysis_folder(analysis)
    assert main(["report", str(analysis)]) == 0
    html = (analysis / "report.html").read_text()
    assert "sink" in html and "data:image/png" in html and "Leaderboard" not in html
    assert not (analysis / "leaderboard.md").exists()

    evaluation = tmp_path / "eval"
    append_result(evaluation / "results.jsonl", {"kind": "row", "model": "smollm2", "label": "softmax", "context": 64,
                                                 "mechanism": "softmax",
                                                 "keys_attended": 32.5, "perplexity": 12.5, "bits_per_byte": 1.25,
                                                 "needle_recall": 1.0, "seconds": 0.5, "peak_rss_mb": 100.0})
    assert main(["report", str(evaluation)]) == 0
    assert "| softmax | 32.5 | 12.5 |" in (evaluation / "leaderboard.md").read_text()

    for name, records in (("unknown", [{"foo": 1}]), ("mixed", [_run("softmax", 0, 3e-3, test=0.5)]),
                          ("empty", [])):
        folder = tmp_path / name
        folder.mkdir()
        for record in records:
            append_result(folder / "results.jsonl", record)
        if name == "mixed":
            _analysis_folder(folder)
        old = "<html>" + "a stored report " * 1000 + "</html>"
        (folder / "report.html").write_text(old)
        capsys.readouterr()
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "run_dir" in err and str(folder) in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert (folder / "report.html").read_text() == old and not (folder / "leaderboard.md").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_outputs_are_written_through_a_temporary_file(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import attnlab.files

    written = []
    original = attnlab.files.atomic_write_bytes

    def spy(path: Path, data: bytes) -> Path:
        written.append(Path(path).name)
        return original(path, data)

    monkeypatch.setattr(attnlab.files, "atomic_write_bytes", spy)
    write_report(run_dir)
    assert sorted(written) == ["leaderboard.md", "report.html"]
    assert len(load_results(run_dir / "results.jsonl")) == 6
