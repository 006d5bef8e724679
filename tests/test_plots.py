"""The quality report's figures: every mechanism is drawn or named with its reason; legends sit outside."""

from __future__ import annotations

import base64
import math

import pytest

from attnlab.bench.plots_quality import legend_outside, missing_note, quality_figures
from attnlab.bench.report import aggregate


def _run(mechanism: str, seed: int, value: float, *, dim: int = 16, state: int | None = None, task: str = "mqar",
         step_s: float | None = 0.01, status: str | None = None) -> dict:
    config = {"seq_len": 32, "dim": dim, "lr": 3e-3} if task == "mqar" else {"dim": dim, "lr": 3e-3}
    record = {"task": task, "mechanism": mechanism, "seed": seed, "lr": 3e-3, "sweep": [3e-3], "config": config,
              "config_label": f"d{dim}", "metric": "accuracy", "higher_is_better": True, "family": "f",
              "value": value, "validation_value": value, "state_size": state, "parameters": 1,
              "loss_curve": [[1, 2.0], [2, 1.0 + value]]}
    if step_s is not None:
        record["train_step_s"] = step_s
    if status is not None:
        record |= {"status": status, "error": "RuntimeError: boom"}
    return record


def _captions(records: list[dict]) -> list[str]:
    figures = quality_figures(aggregate(records))
    for _, data in figures:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    return [caption for caption, _ in figures]


def test_every_mechanism_is_drawn_or_named_with_its_reason() -> None:
    records = []
    for dim in (16, 32):
        records += [_run("softmax", s, 0.9 + 0.01 * s, dim=dim) for s in (0, 1)]  # KV cache: a state size
        records += [_run("lightning", s, 0.5, dim=dim, state=dim * dim) for s in (0, 1)]
        records += [_run("flow", 0, math.nan, dim=dim, state=dim), _run("flow", 1, 0.4, dim=dim, state=dim)]
        records += [_run("hip", 0, 0.0, dim=dim, status="failed")]
        records += [_run("agent", 0, 0.7, dim=dim, step_s=None)]  # an older record: no step time
    captions = _captions(records)
    zoology = [c for c in captions if "against state size" in c]
    assert len(zoology) == 1  # both widths in one picture: one point per (mechanism, width)
    assert "failed: hip (d16), hip (d32)" in zoology[0]
    assert "non-finite metric: flow (d16), flow (d32)" in zoology[0]
    assert "softmax" not in zoology[0] and "lightning" not in zoology[0] and "agent" not in zoology[0]
    frontier = [c for c in captions if "time per training step" in c]
    assert len(frontier) == 2
    assert all("no training-step time recorded: agent" in c and "failed: hip" in c for c in frontier)
    bars = [c for c in captions if "per mechanism at its learning rate" in c]
    assert len(bars) == 2 and all("non-finite metric: flow; failed: hip" in c for c in bars)


def test_a_task_without_a_state_size_says_so() -> None:
    captions = _captions([_run("softmax", 0, 0.9, task="toy"), _run("lightning", 0, 0.8, task="toy", state=64)])
    (zoology,) = [c for c in captions if "against state size" in c]
    assert "no state size: softmax (d16)" in zoology


def test_missing_note_lists_reasons_in_order() -> None:
    assert missing_note({"failed": ["b", "a"], "no state size": []}) == " Not shown: failed: a, b."
    assert missing_note({}) == ""


@pytest.mark.parametrize("entries", [3, 24])
def test_the_legend_sits_outside_the_axes(entries: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index in range(entries):
        axis.plot([1, 2], [index, index + 1], label=f"mechanism {index}")
    legend_outside(axis)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend_box = axis.get_legend().get_window_extent(renderer)
    axes_box = axis.get_window_extent(renderer)
    assert legend_box.x0 >= axes_box.x1  # nothing of the legend over the data
    plt.close(figure)


def test_points_of_equal_state_size_are_spread_apart_around_the_true_value() -> None:
    from attnlab.bench.plots_quality import _spread_sideways

    rows = {r.mechanism: [r] for r in aggregate([_run("softmax", 0, 0.9), _run("moh", 0, 0.9),
                                                 _run("lightning", 0, 0.5, state=64)])}
    factors = _spread_sideways(rows)
    kv = rows["softmax"][0].state_size
    assert rows["moh"][0].state_size == kv  # both hold the same KV cache
    assert factors[("moh", kv)] != factors[("softmax", kv)]
    assert factors[("moh", kv)] * factors[("softmax", kv)] == pytest.approx(1.0)  # centred on the value
    assert factors[("lightning", 64.0)] == 1.0  # alone at its size: not moved
