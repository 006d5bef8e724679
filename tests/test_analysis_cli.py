"""`attnlab analyze` end to end on a tiny randomly initialised Hugging Face model (no download)."""

from __future__ import annotations

import json
import re

import pytest

from attnlab.analysis.models import save_tiny_model
from attnlab.analysis.report import SECTIONS_FILE, read_results, rewrite_report
from attnlab.cli import main


def test_analyze_runs_end_to_end_on_a_tiny_llama(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", kind="llama", layers=2, heads=4, kv_heads=2)
    out = tmp_path / "run"
    code = main(["analyze", "--model", str(folder), "--metrics", "retrieval,sinks,distance,entropy,importance",
                 "--out", str(out), "--lengths", "150", "--depths", "0,50", "--mask-lengths", "150",
                 "--mask-depths", "50", "--mask-k", "2", "--buffer", "50", "--max-new-tokens", "3",
                 "--probe-tokens", "48", "--importance-tokens", "24", "--needles", "1"])
    assert code == 0
    results = read_results(out / "results.jsonl")
    assert [r["metric"] for r in results] == ["distance", "entropy", "sinks", "importance", "retrieval"]
    by_metric = {r["metric"]: r for r in results}
    assert len(by_metric["distance"]["values"]) == 2 and len(by_metric["distance"]["values"][0]) == 4
    assert len(by_metric["retrieval"]["tests"]) == 2 and by_metric["retrieval"]["masking"]["k"] == 2
    assert by_metric["importance"]["tokens"] == 24
    report = (out / "report.html").read_text()
    assert report.count("<img") >= 6 and "retrieval score" in report and "needle accuracy" in report


def test_analyze_on_a_tiny_bert_skips_retrieval_and_appends(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", kind="bert", layers=2, heads=2, dim=32)
    out = tmp_path / "run"
    for _ in range(2):
        assert main(["analyze", "--model", str(folder), "--metrics", "retrieval,entropy,importance", "--out",
                     str(out), "--probe-tokens", "32", "--importance-tokens", "16"]) == 0
    results = read_results(out / "results.jsonl")
    assert [r["metric"] for r in results] == ["entropy", "importance"] * 2  # appended, retrieval skipped
    assert results[1]["measure"].startswith("1 - cos")


def test_analyze_reports_a_missing_model_folder_and_leaves_no_folder(tmp_path, capsys):
    assert main(["analyze", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab analyze: error: --model: ") and "nowhere" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 2-head BERT with max_position_embeddings = 512."""
    return save_tiny_model(tmp_path_factory.mktemp("bert"), kind="bert", layers=2, heads=2, dim=32)


@pytest.mark.parametrize("extra,expected", [
    (["--probe-tokens", "0"], "--probe-tokens=0: must be >= 1"),
    (["--probe-tokens", "600"], "--probe-tokens=600: the model"),
    (["--importance-tokens", "513"], "takes 1..512 tokens"),
    (["--heads", "99-99"], "--heads 99-99: the model"),
    (["--heads", "1-2"], "heads 0..1 per layer"),
    (["--heads", "3"], "'3' is not LAYER-HEAD"),
    (["--metrics", ""], "--metrics is empty"),
    (["--metrics", "entropy,bogus"], "unknown metric(s) bogus"),
    (["--threads", "0"], "--threads=0: must be >= 1"),
    (["--lengths", "4OO"], "--lengths '4OO': expected comma-separated integers"),
    (["--needles", "3"], "--needles=3: must be 1..2"),
], ids=lambda value: value[0] if isinstance(value, list) else None)
def test_bad_arguments_are_refused_before_loading_the_model(tiny_bert, tmp_path, capsys, monkeypatch, extra, expected):
    import attnlab.analysis.models as models

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    out = tmp_path / "run"
    assert main(["analyze", "--model", str(tiny_bert), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab analyze: error: ") and expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_an_out_path_that_is_a_file_is_refused(tiny_bert, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["analyze", "--model", str(tiny_bert), "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"


def test_a_failure_after_loading_removes_the_empty_folder_it_created(tiny_bert, tmp_path, monkeypatch):
    import attnlab.analysis.cli as analysis_cli

    def broken(*args, **kwargs):  # fails after the folder was made, before anything is written
        raise RuntimeError("entropy failed")

    monkeypatch.setattr(analysis_cli, "_entropy", broken)
    base = ["analyze", "--model", str(tiny_bert), "--probe-tokens", "16", "--metrics", "entropy", "--out"]
    assert main([*base, str(tmp_path / "run")]) == 1
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is left alone
    assert main([*base, str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine").is_dir()


def _heatmap_captions(report: str) -> list[str]:
    return re.findall(r"<figcaption>([^<]*)</figcaption>", report)


def test_a_rerun_with_fewer_metrics_keeps_the_other_sections_and_rewrite_report_rebuilds(tiny_bert, tmp_path,
                                                                                           capsys):
    out = tmp_path / "run"
    base = ["analyze", "--model", str(tiny_bert), "--out", str(out), "--probe-tokens", "24",
            "--importance-tokens", "12"]
    assert main([*base, "--metrics", "entropy,importance,distance"]) == 0
    first = _heatmap_captions((out / "report.html").read_text())
    assert {"normalised attention entropy", "mean attention distance (tokens)"} <= set(first)
    assert any(c.startswith("1 - cos(pooled embedding)") for c in first)
    capsys.readouterr()
    assert main([*base, "--metrics", "entropy", "--probe-tokens", "20"]) == 0
    assert "kept from earlier runs" in capsys.readouterr().out
    report = (out / "report.html").read_text()
    assert sorted(_heatmap_captions(report)) == sorted(first)  # importance and distance still there
    assert "sections kept from earlier runs in this folder" in report and "distance, importance" in report
    sections = json.loads((out / SECTIONS_FILE).read_text())["sections"]
    assert sorted(sections) == ["distance", "entropy", "importance"]
    assert "probe 20 tokens" in sections["entropy"]["notes"][0]  # the rerun replaced entropy's section
    assert "probe 24 tokens" in sections["importance"]["notes"][0]
    stored = read_results(out / "results.jsonl")
    assert [r["metric"] for r in stored] == ["distance", "entropy", "importance", "entropy"]
    assert stored[-1]["tokens"] == 20 and stored[1]["tokens"] == 24
    # the heatmap stored for entropy is the rerun's values
    assert sections["entropy"]["heatmaps"]["normalised attention entropy"] == stored[-1]["values"]

    (out / "report.html").unlink()
    assert rewrite_report(out) == out / "report.html"
    assert _heatmap_captions((out / "report.html").read_text()) == _heatmap_captions(report)
    (out / SECTIONS_FILE).unlink()  # a folder with results.jsonl only: the last heatmap of each metric
    rebuilt = _heatmap_captions(rewrite_report(out).read_text())
    assert sorted(rebuilt) == sorted(c for c in first if not c.startswith("layer "))  # no patterns stored there
    with pytest.raises(FileNotFoundError, match="not an `attnlab analyze` folder"):
        rewrite_report(tmp_path / "empty")


def test_ctrl_c_saves_the_finished_metrics_and_says_how_to_resume(tiny_bert, tmp_path, capsys, monkeypatch):
    import attnlab.analysis.cli as analysis_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis_cli, "_importance", interrupted)
    out = tmp_path / "run"
    code = main(["analyze", "--model", str(tiny_bert), "--out", str(out), "--probe-tokens", "16",
                 "--metrics", "entropy,importance"])
    err = capsys.readouterr().err  # transformers' weight-loading bar comes first; the message is one line
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err
    assert last.startswith("interrupted; 1 of 2 metrics saved") and "rerun with --metrics importance" in last
    assert "normalised attention entropy" in (out / "report.html").read_text()
    assert sorted(json.loads((out / SECTIONS_FILE).read_text())["sections"]) == ["entropy"]


def test_retrieval_alone_on_an_encoder_is_refused_and_ctrl_c_before_any_metric_leaves_no_folder(
        tiny_bert, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["analyze", "--model", str(tiny_bert), "--out", str(out), "--metrics", "retrieval"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("attnlab analyze: error: --metrics retrieval: needs a causal LM") and not out.exists()

    import attnlab.analysis.cli as analysis_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis_cli, "_entropy", interrupted)
    code = main(["analyze", "--model", str(tiny_bert), "--out", str(out), "--probe-tokens", "16",
                 "--metrics", "entropy"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 130 and last.startswith("interrupted; 0 of 1 metrics saved") and not out.exists()


def test_a_second_analysis_into_a_held_folder_is_refused_with_the_holder_pid(tiny_bert, tmp_path, capsys):
    """One writer per folder: the report sections are read, merged and written under the folder's lock."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from attnlab.bench.results import exclusive_writer\n"
        "with exclusive_writer(sys.argv[1]):\n"
        "    Path(sys.argv[1], 'holding').write_text('1')\n"
        "    while not Path(sys.argv[1], 'release').exists(): time.sleep(0.02)\n"), str(out)])
    try:
        deadline = time.monotonic() + 120
        while not (out / "holding").exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        code = main(["analyze", "--model", str(tiny_bert), "--out", str(out), "--probe-tokens", "16",
                     "--metrics", "entropy"])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and f"pid {holder.pid}" in last and "choose another --out" in last
        assert not (out / "results.jsonl").exists() and not (out / SECTIONS_FILE).exists()
    finally:
        (out / "release").write_text("1")
        holder.wait(timeout=60)
    assert main(["analyze", "--model", str(tiny_bert), "--out", str(out), "--probe-tokens", "16",
                 "--metrics", "entropy"]) == 0  # released: the folder is free again
