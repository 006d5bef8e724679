"""Learning-rate sweeps of the quality benchmark: the plan, --lrs, the validation split, the record, resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from attnlab.bench.presets import PRESETS, ZOOLOGY_MQAR_LRS, QualityPreset, get_preset, parse_learning_rates
from attnlab.bench.quality import plan_jobs, run_quality
from attnlab.bench.quality_jobs import RESULT_KEY, Job, run_job
from attnlab.bench.quality_tasks import TASKS, TaskData
from attnlab.bench.results import load_results, result_key
from attnlab.cli import main
from attnlab.cli_errors import UsageError
from attnlab.tasks.digits import load_digits_split
from attnlab.tasks.wikitext import load_wikitext_split

SWEEP_FIELDS = {"lr", "sweep", "validation_value", "validation_metrics", "value", "metrics", "train_step_s"}
SYNTHETIC = ("mqar", "needle", "match3", "match2", "incontext_regression")


def _rows(examples: Any) -> set[tuple[float, ...]]:
    """Each example of a held-out set as a hashable row (its inputs, flattened)."""
    inputs = examples.tokens if hasattr(examples, "tokens") else examples[0]  # (n, ...)
    return {tuple(row.flatten().tolist()) for row in inputs}


# ---------------------------------------------------------------------------------------- the plan


def test_the_plan_expands_rates_seeds_mechanisms_and_variants() -> None:
    preset = get_preset("standard")
    variants = preset.tasks["mqar"][:2]
    preset = dataclasses.replace(preset, tasks={"mqar": variants})
    jobs = plan_jobs(["mqar"], ["softmax", "linear"], preset, 2)
    assert len(jobs) == len(ZOOLOGY_MQAR_LRS) * 2 * 2 * len(variants) == 40
    assert {(j.mechanism, j.seed, j.lr, j.label) for j in jobs} == {
        (m, s, lr, TASKS["mqar"].label(c)) for m in ("softmax", "linear") for s in (0, 1)
        for lr in ZOOLOGY_MQAR_LRS for c in variants}
    keys = {result_key(j.key_record(), RESULT_KEY) for j in jobs}
    assert len(keys) == len(jobs)  # every sweep point is its own run
    for job in jobs:
        assert job.config.lr == job.lr and job.sweep == ZOOLOGY_MQAR_LRS
        twin = dataclasses.replace(job, config=dataclasses.replace(job.config, lr=1.0), sweep=())
        # the key differs by the lr field itself, not only through the config
        assert result_key(twin.key_record(), ("lr",)) != result_key(job.key_record(), ("lr",))


def test_standard_and_full_sweep_every_task_while_smoke_and_quick_keep_one_rate() -> None:
    for name in ("standard", "full"):
        preset = PRESETS[name]
        assert set(preset.lrs) == set(preset.tasks) and preset.lrs["mqar"] == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
        for task, rates in preset.lrs.items():
            assert task in TASKS and 3 <= len(rates) <= 5 and list(rates) == sorted(rates)
            for config in preset.tasks[task]:
                assert rates[0] <= config.lr <= rates[-1]  # the grid brackets the rate the config was tuned at
    for name in ("smoke", "quick"):
        preset = PRESETS[name]
        assert not preset.lrs
        jobs = plan_jobs(list(preset.tasks), ["softmax"], preset, 1)
        assert len(jobs) == sum(len(cs) for cs in preset.tasks.values())
        assert all(j.sweep == (j.config.lr,) for j in jobs)


def test_lrs_overrides_the_preset_sweep_for_every_task() -> None:
    preset = get_preset("standard")
    jobs = plan_jobs(["mqar", "digits"], ["softmax"], preset, 1, lrs=[1e-3, 3e-3])
    assert len(jobs) == 2 * (len(preset.tasks["mqar"]) + len(preset.tasks["digits"]))
    assert {j.lr for j in jobs} == {1e-3, 3e-3} and all(j.sweep == (1e-3, 3e-3) for j in jobs)
    one = plan_jobs(["digits"], ["softmax"], get_preset("quick"), 2, lrs=[3e-3])
    assert [(j.lr, j.sweep, j.seed) for j in one] == [(3e-3, (3e-3,), 0), (3e-3, (3e-3,), 1)]
    with pytest.raises(ValueError, match="lrs"):
        plan_jobs(["digits"], ["softmax"], preset, 1, lrs=[1e-3, -1.0])


@pytest.mark.parametrize("text", ["", "0", "-1e-3", "nan", "inf", "1e-3,abc", "1e-3,1e-3"])
def test_a_bad_lrs_is_one_usage_error_naming_lrs(text: str) -> None:
    with pytest.raises(UsageError, match="--lrs"):
        parse_learning_rates(text)


def test_lrs_parses_a_comma_list() -> None:
    assert parse_learning_rates("1e-3, 3e-3") == (1e-3, 3e-3)
    assert parse_learning_rates("0.01") == (0.01,)


def test_a_preset_refuses_a_bad_sweep() -> None:
    with pytest.raises(ValueError, match="lrs"):
        QualityPreset("bad", "", 1, tasks={"digits": [PRESETS["smoke"].tasks["digits"][0]]}, lrs={"digits": (0.0,)})
    with pytest.raises(ValueError, match="sweep"):
        Job("digits", "softmax", 0, PRESETS["smoke"].tasks["digits"][0], "smoke", sweep=(1.0, 2.0))


# ---------------------------------------------------------------------------------------- validation vs test


@pytest.mark.parametrize("preset", ["smoke", "quick"])
@pytest.mark.parametrize("task", SYNTHETIC)
def test_synthetic_validation_and_test_sets_are_different_draws(task: str, preset: str) -> None:
    config = PRESETS[preset].tasks[task][0]
    data: TaskData = TASKS[task].data(config, 0, torch.device("cpu"))
    test, validation = _rows(data.test_set), _rows(data.validation_set)
    assert len(test) > 0.9 * config.test_examples and len(validation) > 0.9 * config.test_examples
    assert not test & validation  # no validation sequence is a test sequence
    other_seed = TASKS[task].data(config, 1, torch.device("cpu"))
    assert not _rows(other_seed.validation_set) & validation  # each seed draws its own validation set
    # and no training batch of the seed repeats a validation sequence (the training stream is a third one)
    train = _rows(data.sample(torch.Generator().manual_seed(1_000_003), 256))
    assert not train & validation


def test_digits_validation_images_are_held_out_of_training_and_apart_from_test() -> None:
    split = load_digits_split(seed=3, test_fraction=0.25, validation_fraction=0.15)
    parts = [set(split.train_index.tolist()), set(split.validation_index.tolist()), set(split.test_index.tolist())]
    assert [len(p) for p in parts] == [1797 - 449 - 270, 270, 449]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert set.union(*parts) == set(range(1797))
    # the test set does not move when a validation set is held out
    without = load_digits_split(seed=3, test_fraction=0.25)
    assert torch.equal(without.test_index, split.test_index) and len(without.validation_labels) == 0
    config = PRESETS["smoke"].tasks["digits"][0]
    data = TASKS["digits"].data(config, 3, torch.device("cpu"))
    torch.testing.assert_close(data.validation_set[0], split.validation_images)
    torch.testing.assert_close(data.test_set[1], split.test_labels)


def test_wikitext_validation_articles_are_held_out_of_training_and_apart_from_test() -> None:
    split = load_wikitext_split(seed=0, test_fraction=0.1, validation_fraction=0.1)
    train, validation, test = (set(a) for a in (split.train_articles, split.validation_articles, split.test_articles))
    assert validation and test and not train & validation and not train & test and not validation & test
    assert split.validation.numel() > 50_000 and split.test.numel() > 50_000
    without = load_wikitext_split(seed=0, test_fraction=0.1, validation_fraction=0.0)
    assert without.test_articles == split.test_articles and without.validation.numel() == 0
    assert split.train.numel() + split.validation.numel() == pytest.approx(without.train.numel(), rel=1e-3)


# ---------------------------------------------------------------------------------------- records, pairing, resume


def test_a_swept_record_carries_validation_and_step_time(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_quality(tasks=["mqar", "digits"], mechanisms=["softmax"], preset="smoke", out_dir=out, progress=False,
                lrs=[1e-3, 3e-3])
    records = load_results(out / "results.jsonl")
    assert sorted((r["task"], r["lr"]) for r in records) == [("digits", 1e-3), ("digits", 3e-3),
                                                             ("mqar", 1e-3), ("mqar", 3e-3)]
    for record in records:
        assert SWEEP_FIELDS <= set(record)
        assert record["sweep"] == [1e-3, 3e-3] and record["config"]["lr"] == record["lr"]
        assert record["metric"] == "accuracy" and 0.0 <= record["validation_value"] <= 1.0
        assert record["validation_value"] == record["validation_metrics"]["accuracy"]
        assert record["value"] == record["metrics"]["accuracy"] and "validation_loss" in record["validation_metrics"]
        assert math.isfinite(record["validation_metrics"]["validation_loss"])
        assert 0.0 < record["train_step_s"] < record["wall_time_s"] / record["steps"] + 1e-9
    by_lr = {r["lr"]: r for r in records if r["task"] == "mqar"}
    assert by_lr[1e-3]["loss_curve"] != by_lr[3e-3]["loss_curve"]  # the rate was applied
    json.dumps(records, allow_nan=False)  # every field is plain JSON


def test_an_unswept_preset_records_a_one_rate_sweep(tmp_path: Path) -> None:
    run_quality(tasks=["incontext_regression"], mechanisms=["softmax"], preset="smoke", out_dir=tmp_path,
                progress=False)
    (record,) = load_results(tmp_path / "results.jsonl")
    config_lr = PRESETS["smoke"].tasks["incontext_regression"][0].lr
    assert record["lr"] == config_lr and record["sweep"] == [config_lr]
    assert record["validation_value"] == record["validation_metrics"]["mse"] > 0
    assert record["validation_value"] != record["value"]  # two different prompt sets


def test_runs_of_one_seed_see_the_same_data_at_every_rate_and_for_every_mechanism(
        monkeypatch: pytest.MonkeyPatch) -> None:
    task = TASKS["mqar"]
    first_batches: list[torch.Tensor] = []
    held_out: list[torch.Tensor] = []

    def recording_data(config: Any, seed: int, device: torch.device) -> TaskData:
        data = task.data(config, seed, device)
        held_out.append(data.validation_set[0])

        def sample(generator: torch.Generator, n: int) -> Any:
            batch = data.sample(generator, n)
            if len(first_batches) < len(held_out):
                first_batches.append(batch[0])
            return batch

        return dataclasses.replace(data, sample=sample)

    monkeypatch.setitem(TASKS, "mqar", dataclasses.replace(task, data=recording_data))
    config = PRESETS["smoke"].tasks["mqar"][0]
    for mechanism, lr in (("softmax", 1e-3), ("softmax", 1e-2), ("linear", 1e-3)):
        run_job(Job("mqar", mechanism, 0, dataclasses.replace(config, lr=lr), "smoke"))
    for batch in first_batches[1:]:
        assert torch.equal(batch, first_batches[0])
    for validation in held_out[1:]:
        assert torch.equal(validation, held_out[0])


def test_a_run_does_not_depend_on_the_runs_before_it() -> None:
    config = PRESETS["smoke"].tasks["match2"][0]
    job = Job("match2", "softmax", 1, dataclasses.replace(config, lr=3e-3), "smoke", sweep=(1e-3, 3e-3))
    alone, _ = run_job(job)
    run_job(Job("match2", "linear", 0, dataclasses.replace(config, lr=1e-3), "smoke"))
    torch.manual_seed(12345)
    again, _ = run_job(job)
    for field in ("value", "metrics", "validation_value", "validation_metrics", "loss_curve"):
        assert again[field] == alone[field], field


def test_resume_skips_the_finished_sweep_points(tmp_path: Path) -> None:
    run_quality(tasks=["needle"], mechanisms=["softmax"], preset="smoke", out_dir=tmp_path, progress=False,
                lrs=[3e-3])
    first = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(first) == 1
    run_quality(tasks=["needle"], mechanisms=["softmax"], preset="smoke", out_dir=tmp_path, progress=False,
                lrs=[1e-3, 3e-3])
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert lines[:1] == first and len(lines) == 2  # only the new rate trained
    assert json.loads(lines[1])["lr"] == 1e-3
    run_quality(tasks=["needle"], mechanisms=["softmax"], preset="smoke", out_dir=tmp_path, progress=False,
                lrs=[1e-3, 3e-3])
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines


def test_cli_lrs_runs_each_rate_and_refuses_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["bench", "quality", "--tasks", "match3", "--mechanisms", "softmax", "--preset", "smoke",
            "--out", str(out), "--no-progress"]
    assert main([*args, "--lrs", "1e-3,3e-3"]) == 0
    assert sorted(r["lr"] for r in load_results(out / "results.jsonl")) == [1e-3, 3e-3]
    capsys.readouterr()
    assert main([*args, "--lrs", "1e-3,-2"]) == 2
    captured = capsys.readouterr()
    assert "--lrs" in captured.err + captured.out and "positive" in captured.err + captured.out
    assert len(load_results(out / "results.jsonl")) == 2


def test_train_step_s_times_the_steps_and_leaves_out_evaluation_and_progress() -> None:
    import time

    from attnlab.bench.training import train_loop

    def sample(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.05)  # a step that cannot take less than 50 ms
        x = torch.randn(n, 4, generator=generator)
        return x, x.sum(-1, keepdim=True)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        time.sleep(1.0)  # would add 0.25 s per step if it were counted
        return {"mse": 0.0}

    outcome = train_loop(torch.nn.Linear(4, 1), steps=4, lr=1e-2, weight_decay=0.0, batch_size=8, seed=0,
                         sample=sample, loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                         evaluate=evaluate, validate=lambda m: {"mse": 1.0}, device=torch.device("cpu"),
                         on_step=lambda step: time.sleep(0.3))
    assert 0.05 <= outcome.train_step_s < 0.2
    assert outcome.validation_metrics == {"mse": 1.0} and outcome.metrics == {"mse": 0.0}
