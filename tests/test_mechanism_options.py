"""Mechanism specs with options (``linear:feature_map=taylor:feature_dim=4``) and ``steps`` overrides in the
quality benchmark: parsing, one canonical name, the options reach the model, and relabelled variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnlab.bench.presets import get_preset
from attnlab.bench.quality import QualityError, plan_jobs, run_quality
from attnlab.bench.quality_jobs import Job
from attnlab.cli import main
from attnlab.mechanism_spec import MechanismSpec, canonical, model_spec


def test_a_spec_reads_typed_values_and_writes_one_sorted_name() -> None:
    spec = model_spec(" linear : feature_map=taylor : feature_dim=16:normalize=false:eps=1e-3")
    assert spec == MechanismSpec("linear", {"eps": 1e-3, "feature_dim": 16, "feature_map": "taylor",
                                            "normalize": False})
    assert type(spec.options["feature_dim"]) is int and type(spec.options["eps"]) is float
    assert str(spec) == "linear:eps=0.001:feature_dim=16:feature_map=taylor:normalize=false"
    assert canonical(str(spec)) == str(spec)  # the written form reads back to itself
    assert canonical("sliding_window:window=8:sink_tokens=none") == "sliding_window:sink_tokens=none:window=8"
    assert model_spec("sliding_window:sink_tokens=none").options["sink_tokens"] is None
    assert canonical("softmax") == "softmax"  # a plain name is its own spec: old records keep their keys


@pytest.mark.parametrize(("text", "words"), [
    ("linear:window=4", ["'linear'", "no option 'window'", "feature_map"]),
    ("linear:feature_map", ["'feature_map'", "key=value"]),
    ("linear:eps=1:eps=2", ["'eps'", "twice"]),
    (":window=4", ["names no mechanism"]),
    ("linear:initial_state=none", ["no option 'initial_state'"]),  # the op's state interface is not a model option
])
def test_bad_specs_name_the_part_and_the_fix(text: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        model_spec(text)
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_an_unknown_mechanism_in_a_spec_names_the_closest() -> None:
    with pytest.raises(KeyError, match="did you mean 'linear'"):
        model_spec("lineer:feature_dim=4")


def test_options_reach_the_model_and_make_their_own_rows(tmp_path: Path) -> None:
    out = tmp_path / "run"
    plain, taylor = "linear", "linear:feature_map=taylor:feature_dim=4"
    records = run_quality(tasks=["mqar"], mechanisms=[plain, taylor], preset="smoke", seeds=1, out_dir=out,
                          progress=False)
    by_name = {r["mechanism"]: r for r in records}
    assert set(by_name) == {plain, "linear:feature_dim=4:feature_map=taylor"}
    narrow = by_name["linear:feature_dim=4:feature_map=taylor"]
    assert narrow["mixer_options"]["feature_map"] == "taylor" and narrow["mixer_options"]["feature_dim"] == 4
    # smoke MQAR: width 16, 2 heads of 8, 2 layers, no projection bias. feature_dim=4 narrows the queries
    # (16 -> 2*4 outputs) and the keys (2*(8+8) -> 2*(4+8) outputs): 8 + 8 = 16 outputs of 16 weights per layer
    assert by_name[plain]["parameters"] - narrow["parameters"] == 2 * 16 * 16
    # linear attention keeps S = sum phi(k) v^T and z = sum phi(k) per head: F * (8 + 1) floats for F key
    # features. Taylor on f = 4 dims has F = 1 + 4 + 16 = 21; elu+1 on the head's 8 dims has F = 8
    assert narrow["state_size"] == 2 * 2 * 21 * (8 + 1)  # layers * heads
    assert by_name[plain]["state_size"] == 2 * 2 * 8 * (8 + 1)

    lines = (out / "results.jsonl").read_text().splitlines()
    run_quality(tasks=["mqar"], mechanisms=["linear:feature_dim=4:feature_map=taylor"], preset="smoke", seeds=1,
                out_dir=out, progress=False)  # the same spec typed in another order resumes
    assert (out / "results.jsonl").read_text().splitlines() == lines


def test_a_bad_spec_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(QualityError, match="no option 'window'"):
        run_quality(tasks=["mqar"], mechanisms=["linear:window=3"], preset="smoke", seeds=1, out_dir=tmp_path / "r",
                    progress=False)
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_steps_relabel_only_the_configs_they_change() -> None:
    preset = get_preset("smoke")
    own = preset.tasks["mqar"][0].steps
    jobs = plan_jobs(["mqar"], ["softmax"], preset, 1, steps=own + 3)
    assert [j.config.steps for j in jobs] == [own + 3]
    assert jobs[0].label == f"V64-L16-P2-d16-{own + 3}steps"
    assert Job.from_json(json.loads(json.dumps(jobs[0].to_json()))) == jobs[0]  # what workers and torchrun get
    same = plan_jobs(["mqar"], ["softmax"], preset, 1, steps=own)
    assert same == plan_jobs(["mqar"], ["softmax"], preset, 1) and same[0].label == "V64-L16-P2-d16"
    with pytest.raises(QualityError, match="steps=0"):
        plan_jobs(["mqar"], ["softmax"], preset, 1, steps=0)


def test_cli_runs_specs_and_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["bench", "quality", "--preset", "smoke", "--tasks", "mqar", "--no-progress", "--steps", "3",
                 "--mechanisms", "softmax,sliding_window:window=4", "--workers", "1", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["mechanism"] for r in records) == ["sliding_window:window=4", "softmax"]
    assert {r["config_label"] for r in records} == {"V64-L16-P2-d16-3steps"}
    assert all(r["loss_curve"][-1][0] == 3 == r["config"]["steps"] for r in records)
    assert next(r for r in records if r["mechanism"] != "softmax")["mixer_options"]["window"] == 4
    assert "sliding_window:window=4" in capsys.readouterr().out  # the leaderboard row
