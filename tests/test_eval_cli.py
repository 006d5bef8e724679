"""``attnlab eval`` on a tiny local llama: spec parsing, rolling windows, rows, report and resume."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from attnlab.analysis.models import load_model, save_tiny_model
from attnlab.analysis.retrieval import wikipedia_haystack
from attnlab.cli import build_parser, main
from attnlab.hf import eval_cli
from attnlab.hf.eval import MechanismSpec, parse_mechanisms, rolling_perplexity, rolling_windows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_model(root / "llama", kind="llama", layers=2, heads=4, kv_heads=2, dim=32, seed=1)
    text = root / "text.txt"
    text.write_text(wikipedia_haystack(max_chars=30_000)[10_000:])
    return model, text


def run_cli(*argv: str) -> int:
    """``attnlab eval ARGV`` through the real command line (attnlab.cli registers eval_cli)."""
    return main(["eval", *argv])


def test_eval_is_a_command_of_attnlab() -> None:
    parser = argparse.ArgumentParser()
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["eval", "--out", "x"]).func is eval_cli.run
    assert build_parser().parse_args(["eval", "--out", "x"]).func is eval_cli.run


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_parse_mechanisms_reads_names_and_typed_options() -> None:
    specs = parse_mechanisms("softmax, hip:k_budget=256,sliding_window:window=256:sink_tokens=4")
    assert specs == [MechanismSpec("softmax"), MechanismSpec("hip", {"k_budget": 256}),
                     MechanismSpec("sliding_window", {"window": 256, "sink_tokens": 4})]
    assert specs[2].label == "sliding_window:window=256:sink_tokens=4"
    with pytest.raises(ValueError, match="'window' is not key=value"):
        parse_mechanisms("sliding_window:window")
    with pytest.raises(ValueError, match="'k_budgt'.*k_budget"):
        parse_mechanisms("hip:k_budgt=3")
    with pytest.raises(ValueError, match="needs a model trained with it"):
        parse_mechanisms("softmax,lightning")
    with pytest.raises(ValueError, match="names no mechanism"):
        parse_mechanisms(" , ")


@pytest.mark.parametrize("n,context,stride,limit", [(1000, 128, 64, 100), (1000, 128, 127, 3), (300, 100, 30, 100)])
def test_rolling_windows_tile_the_text_with_enough_context(n: int, context: int, stride: int, limit: int) -> None:
    windows = rolling_windows(n, context, stride, limit)
    assert 1 <= len(windows) <= limit
    assert windows[0][2] == 1  # the first token has nothing to be predicted from
    for (begin, end, first), nxt in zip(windows, windows[1:] + [None], strict=True):
        assert end - begin == context and end <= n
        assert first > begin and (begin == 0 or first - begin >= context - stride)
        if nxt is not None:
            assert nxt[2] == end  # the next window scores exactly the tokens after this one
    if len(windows) < limit:
        assert windows[-1][0] + stride + context > n  # no room for one more
    with pytest.raises(ValueError, match="fewer than context"):
        rolling_windows(50, 64, 32, 4)
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(500, 64, 64, 4)


def test_rolling_perplexity_sums_the_token_log_likelihoods(tiny: tuple[Path, Path]) -> None:
    model = load_model(str(tiny[0])).model
    tokens = torch.randint(0, 1000, (200,), generator=torch.Generator().manual_seed(0))
    windows = rolling_windows(200, 64, 32, 100)
    nll, count = rolling_perplexity(model, tokens, windows)
    expected, scored = 0.0, 0
    with torch.no_grad():
        for begin, end, first in windows:
            log_probs = torch.log_softmax(model(input_ids=tokens[None, begin:end]).logits[0].double(), dim=-1)
            for t in range(first, end):
                expected -= float(log_probs[t - begin - 1, tokens[t]])
                scored += 1
    assert count == scored == windows[-1][1] - 1  # every token after the first, once
    assert nll == pytest.approx(expected, rel=1e-5)


def test_eval_rows_report_and_resume(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny
    out = tmp_path / "run"
    common = ("--model", str(model), "--text", str(text), "--context", "64,96", "--windows", "2",
              "--needle-depths", "0.5", "--needle-new-tokens", "4", "--out", str(out), "--threads", "1",
              "--no-progress")
    assert run_cli("--mechanisms", "softmax,sliding_window:window=128,sliding_window:window=8:sink_tokens=2",
                   *common) == 0
    first = rows(out)
    assert len(first) == 6 and {r["kind"] for r in first} == {"row"}
    for r in first:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["bits_per_byte"] * r["scored_bytes"] * math.log(2) == pytest.approx(r["nll"])
        assert r["needle_tests"] == 1 and 0 <= r["needle_recall"] <= 100
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0
    by = {(r["label"], r["context"]): r for r in first}
    for context in (64, 96):
        dense, covering = by[("softmax", context)], by[("sliding_window:window=128", context)]
        assert covering["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)  # window >= context
        assert dense["keys_attended"] == pytest.approx((context + 1) / 2)
        narrow = by[("sliding_window:window=8:sink_tokens=2", context)]
        assert narrow["keys_attended"] < 10 and narrow["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-6)
    leaderboard = (out / "leaderboard.md").read_text()
    assert "sliding_window:window=8:sink_tokens=2" in leaderboard and "context 96" in leaderboard
    assert "data:image/png;base64," in (out / "report.html").read_text()

    assert run_cli("--mechanisms", "softmax,sliding_window:window=128,sliding_window:window=8:sink_tokens=2",
                   *common) == 0
    assert rows(out) == first  # resumed: nothing recomputed
    assert run_cli("--mechanisms", "softmax,hip:k_budget=16:block_size_q=8:window=8", *common) == 0
    added = rows(out)[len(first):]
    assert [(r["label"], r["context"]) for r in added] == [("hip:k_budget=16:block_size_q=8:window=8", 64),
                                                          ("hip:k_budget=16:block_size_q=8:window=8", 96)]


def test_eval_compare_sdpa_rows_and_refusals(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny
    out = tmp_path / "timing"
    assert run_cli("--model", str(model), "--text", str(text), "--context", "64", "--windows", "1",
                   "--needle-depths", "", "--mechanisms", "softmax", "--compare-sdpa", "2", "--out", str(out),
                   "--no-progress") == 0
    timing = [r for r in rows(out) if r["kind"] == "prefill_timing"]
    assert len(timing) == 1 and len(timing[0]["sdpa_all_s"]) == 2
    assert timing[0]["ratio"] == pytest.approx(timing[0]["attnlab_softmax_s"] / timing[0]["sdpa_s"])
    assert run_cli("--model", str(model), "--mechanisms", "lightning", "--out", str(tmp_path / "x")) == 2
    assert run_cli("--model", "minilm", "--text", str(text), "--mechanisms", "softmax",
                   "--out", str(tmp_path / "y")) == 2
