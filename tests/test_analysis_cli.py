"""`attnlab analyze` end to end on a tiny randomly initialised Hugging Face model (no download)."""

from __future__ import annotations

from attnlab.analysis.models import save_tiny_model
from attnlab.analysis.report import read_results
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


def test_analyze_reports_a_missing_model_folder(tmp_path, capsys):
    assert main(["analyze", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    assert "nowhere" in capsys.readouterr().out
