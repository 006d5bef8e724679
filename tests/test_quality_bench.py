"""The quality runner: JSON format, resume, refusals before training, presets and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.bench.presets import PRESETS, get_preset
from attnlab.bench.quality import QualityError, run_quality, validate
from attnlab.bench.quality_jobs import RESULT_KEY
from attnlab.bench.quality_tasks import TASKS
from attnlab.bench.results import append_result, load_results, result_key
from attnlab.cli import main
from attnlab.registry import _REGISTRY

SMOKE_FIELDS = {"task", "mechanism", "seed", "config", "config_label", "preset", "metric", "value", "metrics",
                "loss_curve", "parameters", "state_size", "wall_time_s", "versions", "world_size", "steps",
                "higher_is_better", "mixer_options", "status"}


@pytest.fixture
def fake_bidirectional(monkeypatch: pytest.MonkeyPatch) -> str:
    softmax = attnlab.get("softmax")
    monkeypatch.setitem(_REGISTRY, "fake_bidirectional",
                        dataclasses.replace(softmax, name="fake_bidirectional", supports_causal=False))
    return "fake_bidirectional"


def test_runs_append_one_json_line_each_and_rerunning_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    records = run_quality(tasks=["mqar", "incontext_regression"], mechanisms=["softmax"], preset="smoke", seeds=1,
                          out_dir=out, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 == len(records)
    for line in lines:
        record = json.loads(line)
        assert SMOKE_FIELDS <= set(record)
        assert record["metric"] in record["metrics"] and record["value"] == record["metrics"][record["metric"]]
        assert record["loss_curve"][-1][0] == record["steps"] == record["config"]["steps"]
        assert record["versions"]["torch"] and record["world_size"] == 1 and record["status"] == "ok"
    icl = next(r for r in records if r["task"] == "incontext_regression")
    assert icl["metric"] == "mse" and icl["metrics"]["baseline_ridge"] < icl["metrics"]["baseline_zero"]

    again = run_quality(tasks=["mqar", "incontext_regression"], mechanisms=["softmax"], preset="smoke", seeds=1,
                        out_dir=out, progress=False)
    assert (out / "results.jsonl").read_text().splitlines() == lines  # nothing retrained
    assert sorted(r["task"] for r in again) == ["incontext_regression", "mqar"]

    run_quality(tasks=["mqar"], mechanisms=["softmax"], preset="smoke", seeds=2, out_dir=out, progress=False)
    seeds = sorted(r["seed"] for r in load_results(out / "results.jsonl") if r["task"] == "mqar")
    assert seeds == [0, 1]  # only the missing seed was trained


def test_an_interrupted_write_loses_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_quality(tasks=["mqar"], mechanisms=["softmax"], preset="smoke", seeds=2, out_dir=out, progress=False)
    path = out / "results.jsonl"
    first, second = path.read_text().splitlines()
    path.write_text(first + "\n" + second[: len(second) // 2])  # the process died while writing seed 1
    assert [r["seed"] for r in load_results(path)] == [0]
    run_quality(tasks=["mqar"], mechanisms=["softmax"], preset="smoke", seeds=2, out_dir=out, progress=False)
    assert sorted(r["seed"] for r in load_results(path)) == [0, 1]


def test_refusals_come_before_any_training(tmp_path: Path, fake_bidirectional: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(QualityError, match="fake_bidirectional on mqar: .*no causal form"):
        run_quality(tasks=["incontext_regression", "mqar"], mechanisms=["softmax", fake_bidirectional],
                    preset="smoke", out_dir=out, progress=False)
    assert not (out / "results.jsonl").exists()
    with pytest.raises(QualityError, match="unknown task.*'mqr'.*mqar"):
        run_quality(tasks=["mqr"], mechanisms=["softmax"], preset="smoke", out_dir=out, progress=False)
    with pytest.raises(QualityError, match="unknown mechanism 'sofmax'.*'softmax'"):
        run_quality(tasks=["mqar"], mechanisms=["sofmax"], preset="smoke", out_dir=out, progress=False)
    assert not (out / "results.jsonl").exists()
    # a bidirectional-only mechanism does fit an encoder task
    assert validate(["match3", "digits"], [fake_bidirectional], get_preset("smoke")) == []


def test_a_mechanism_that_cannot_run_at_the_task_sizes_is_refused_with_its_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    softmax = attnlab.get("softmax")

    def needs_short(q, k, v, *, causal=False, scale=None):
        if q.shape[-2] > 4:
            raise ValueError(f"sequence length {q.shape[-2]} is longer than 4")
        return softmax.op(q, k, v, causal=causal, scale=scale)

    monkeypatch.setitem(_REGISTRY, "fake_short", dataclasses.replace(softmax, name="fake_short", op=needs_short))
    refusals = validate(["mqar"], ["fake_short", "softmax"], get_preset("smoke"))
    assert [r.mechanism for r in refusals] == ["fake_short"]
    assert "sequence length 16 is longer than 4" in refusals[0].reason


def test_presets_are_typed_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(PRESETS) == {"smoke", "quick", "standard", "full"}
    for preset in PRESETS.values():
        for task, configs in preset.tasks.items():
            assert configs and all(isinstance(c, TASKS[task].config_type) for c in configs)
    standard = get_preset("standard").tasks["mqar"]
    assert {(c.vocab_size, c.seq_len, c.num_pairs, c.dim) for c in standard} == {
        (8192, 64, 8, 64), (8192, 64, 8, 128), (8192, 256, 16, 64), (8192, 256, 16, 128)}
    assert main(["bench", "quality", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "V8192-L64-P8-d64" in out


def test_cli_runs_resumes_and_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      fake_bidirectional: str) -> None:
    out = tmp_path / "cli"
    args = ["bench", "quality", "--tasks", "match2", "--mechanisms", "softmax", "--preset", "smoke", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    assert len(load_results(out / "results.jsonl")) == 1
    assert main(args) == 0
    assert "1 already in" in capsys.readouterr().out
    # the one pair does not fit: its refusal is printed, and a plan of 0 runs is an error naming --mechanisms
    assert main(["bench", "quality", "--tasks", "needle", "--mechanisms", fake_bidirectional, "--preset", "smoke",
                 "--out", str(out), "--no-progress"]) == 2
    printed = capsys.readouterr()
    assert f"skipped {fake_bidirectional} on needle: " in printed.out and "no causal form" in printed.out
    assert "--mechanisms" in printed.err and "nothing to run" in printed.err
    assert len(load_results(out / "results.jsonl")) == 1


def test_results_file_helpers_are_generic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "speed.jsonl"
    append_result(path, {"op": "softmax", "shape": [1, 2], "ms": 0.5})
    append_result(path, {"op": "lightning", "shape": [1, 2], "ms": 0.25})
    records = load_results(path)
    assert [r["op"] for r in records] == ["softmax", "lightning"]
    assert result_key(records[0], ("op", "shape")) == ("softmax", "[1, 2]")
    assert result_key({"task": "a", "config": {"b": 1, "a": 2}}, RESULT_KEY) == \
        result_key({"config": {"a": 2, "b": 1}, "task": "a"}, RESULT_KEY)


def test_every_task_runs_at_smoke_size_and_scores_in_range(tmp_path: Path) -> None:
    tasks = ["match3", "needle", "wikitext", "digits"]
    records = run_quality(tasks=tasks, mechanisms=["softmax"], preset="smoke", out_dir=tmp_path, progress=False)
    by_task = {r["task"]: r for r in records}
    assert set(by_task) == set(tasks)
    for task in ("match3", "needle", "digits"):
        assert 0.0 <= by_task[task]["value"] <= 1.0 and by_task[task]["metric"] == "accuracy"
    assert 0.3 < by_task["match3"]["metrics"]["positive_rate"] < 0.9
    # an untrained byte model is near log2(256) = 8 bits per byte; 8 steps cannot reach 0
    assert 3.0 < by_task["wikitext"]["value"] < 9.0 and by_task["wikitext"]["higher_is_better"] is False


def test_mqar_answer_loss_equals_the_full_language_model_loss() -> None:
    """MQAR trains on logits at the answer positions only; value and gradients equal the masked full loss."""
    from attnlab.bench.quality_tasks import answer_loss, lm_loss
    from attnlab.tasks.mqar import multiquery_ar

    torch.manual_seed(3)
    config = dataclasses.replace(get_preset("standard").tasks["mqar"][0], vocab_size=512, dim=32)
    model = TASKS["mqar"].build(config, "softmax", True)
    assert model.head.weight is model.embed.weight  # the standard recipe ties the read-out
    batch = multiquery_ar(8, vocab_size=512, seq_len=64, num_pairs=8, generator=torch.Generator().manual_seed(5))
    full = lm_loss(model, batch)
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    sparse = answer_loss(model, batch)
    sparse_grads = torch.autograd.grad(sparse, list(model.parameters()))
    torch.testing.assert_close(sparse, full)
    for a, b in zip(sparse_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    quick = get_preset("quick").tasks["mqar"][0]
    quick_model = TASKS["mqar"].build(quick, "softmax", True)
    assert quick_model.head.weight is not quick_model.embed.weight and config.heads == 1
