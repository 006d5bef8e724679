"""``attnlab report runs/NAME``: ``report.html`` (self-contained, plots embedded) and ``leaderboard.md``.

Reads ``results.jsonl`` (quality runs) and, when present, ``speed.jsonl`` (its section comes from
``attnlab.bench.speed_report.render_speed_section``). Metrics are shown as mean +- standard deviation
over seeds (sample std, 0 for one seed). :func:`print_leaderboard` prints the same tables to a terminal.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.bench.markdown_html import markdown_to_html
from attnlab.bench.results import load_results

__all__ = ["Row", "aggregate", "leaderboard_markdown", "print_leaderboard", "write_report", "state_size_of"]


@dataclass
class Row:
    """One (task, config, mechanism) cell of the leaderboard."""

    task: str
    config_label: str
    mechanism: str
    family: str
    metric: str
    higher_is_better: bool
    values: list[float]
    parameters: int
    state_size: float | None
    state_size_kind: str
    wall_time_s: float
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def state_size_of(record: dict[str, Any]) -> tuple[float | None, str]:
    """(floats of state per sequence, "recurrent" | "kv-cache" | "n/a").

    Recurrent mechanisms report their state; for the others (softmax and friends) the cache a decoder
    keeps grows with the sequence: ``2 * N * dim * depth`` floats, as zoology plots it.
    """
    if record.get("state_size") is not None:
        return float(record["state_size"]), "recurrent"
    config = record.get("config", {})
    length = config.get("seq_len") or config.get("length")
    dim, depth = config.get("dim"), config.get("depth", 1)
    if record.get("task") == "incontext_regression" and dim is not None:
        length, dim = config.get("length", 0) + 1, config.get("heads", 1) * (dim + 1)
    if length and dim:
        return float(2 * length * dim * depth), "kv-cache"
    return None, "n/a"


def aggregate(records: Iterable[dict[str, Any]]) -> list[Row]:
    """Group records by (task, config label, mechanism); rows sorted by task, config, then best first."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if not all(k in record for k in ("task", "mechanism", "value", "metric")):
            continue
        groups[(record["task"], record.get("config_label", "-"), record["mechanism"])].append(record)
    rows = []
    for (task, label, mechanism), group in groups.items():
        first = group[0]
        size, kind = state_size_of(first)
        extras: dict[str, float] = {}
        for key in ("baseline_ridge", "baseline_debiased_gd_one_step", "ratio_to_debiased_gd"):
            values = [r.get("metrics", {}).get(key) for r in group]
            if all(isinstance(v, int | float) for v in values) and values:
                extras[key] = statistics.fmean(values)
        rows.append(Row(task, label, mechanism, first.get("family", "-"), first["metric"],
                        bool(first.get("higher_is_better", True)), [float(r["value"]) for r in group],
                        int(first.get("parameters", 0)), size, kind,
                        statistics.fmean(float(r.get("wall_time_s", 0.0)) for r in group), extras))

    def order(row: Row) -> tuple[Any, ...]:
        score = row.mean if math.isfinite(row.mean) else (-math.inf if row.higher_is_better else math.inf)
        return (row.task, row.config_label, -score if row.higher_is_better else score, row.mechanism)

    return sorted(rows, key=order)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _by_table(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    tables: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        tables[(row.task, row.config_label)].append(row)
    return tables


def leaderboard_markdown(rows: Sequence[Row], *, title: str = "Leaderboard") -> str:
    """One markdown table per (task, config), best mechanism first."""
    lines = [f"# {title}", ""]
    for (task, label), group in _by_table(rows).items():
        first = group[0]
        direction = "higher is better" if first.higher_is_better else "lower is better"
        lines += [f"## {task} ({label})", "", f"Metric: {first.metric} ({direction}); mean ± std over seeds.", ""]
        lines += ["| rank | mechanism | family | " + first.metric + " | seeds | parameters | state size | time (s) |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        for rank, row in enumerate(group, 1):
            state = "-" if row.state_size is None else f"{row.state_size:.0f}" + (
                " (KV cache)" if row.state_size_kind == "kv-cache" else "")
            lines.append(f"| {rank} | {row.mechanism} | {row.family} | {_fmt(row.mean)} ± {_fmt(row.std)} | "
                         f"{len(row.values)} | {row.parameters:,} | {state} | {row.wall_time_s:.1f} |")
        if "baseline_ridge" in first.extras:
            ridge, dgd = first.extras["baseline_ridge"], first.extras.get("baseline_debiased_gd_one_step", math.nan)
            lines += ["", f"Baselines on the same test prompts: ridge (Bayes-optimal) {_fmt(ridge)}, best one-step "
                          f"debiased gradient descent {_fmt(dgd)}."]
        lines.append("")
    return "\n".join(lines)


def print_leaderboard(records: Sequence[dict[str, Any]], console: Any) -> None:
    """Print one table per (task, config) to ``console`` (a ``rich.console.Console``), best first."""
    from rich.table import Table

    for (task, label), group in _by_table(aggregate(records)).items():
        direction = "higher is better" if group[0].higher_is_better else "lower is better"
        table = Table(title=f"{task} ({label}): {group[0].metric}, {direction}")
        for column in ("rank", "mechanism", "family", group[0].metric, "seeds", "params", "time (s)"):
            table.add_column(column)
        for rank, row in enumerate(group, 1):
            table.add_row(str(rank), row.mechanism, row.family, f"{row.mean:.4f} ± {row.std:.4f}",
                          str(len(row.values)), f"{row.parameters:,}", f"{row.wall_time_s:.1f}")
        console.print(table)
        if "baseline_ridge" in group[0].extras:
            console.print(f"  baselines: ridge {group[0].extras['baseline_ridge']:.4f}, one-step debiased GD "
                          f"{group[0].extras['baseline_debiased_gd_one_step']:.4f}")


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(rows: Sequence[Row], records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) pairs: metric bars per table, accuracy vs state size, loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for (task, label), group in _by_table(rows).items():
        figure, axis = plt.subplots(figsize=(6, 0.35 * len(group) + 1.2))
        names = [r.mechanism for r in group][::-1]
        axis.barh(names, [r.mean for r in group][::-1], xerr=[r.std for r in group][::-1], color="#4c72b0")
        axis.set_xlabel(group[0].metric)
        axis.set_title(f"{task} ({label})")
        images.append((f"{task} ({label}): {group[0].metric} per mechanism", _png(figure)))

    for task in sorted({r.task for r in rows}):
        points = [r for r in rows if r.task == task and r.state_size and r.higher_is_better]
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(6, 4))
        for mechanism in sorted({p.mechanism for p in points}):
            mine = sorted((p for p in points if p.mechanism == mechanism), key=lambda p: p.state_size)
            axis.plot([p.state_size for p in mine], [p.mean for p in mine], "o-", label=mechanism)
        axis.set_xscale("log")
        axis.set_xlabel("state size (floats per sequence; KV cache for attention)")
        axis.set_ylabel(points[0].metric)
        axis.set_title(f"{task}: {points[0].metric} vs state size")
        axis.legend(fontsize=7)
        images.append((f"{task}: {points[0].metric} versus state size (as zoology plots it)", _png(figure)))

    curves: dict[tuple[str, str], dict[str, list[list[float]]]] = defaultdict(dict)
    for record in records:
        if record.get("loss_curve") and record.get("seed", 0) == min(
                r.get("seed", 0) for r in records if r.get("task") == record.get("task")):
            curves[(record["task"], record.get("config_label", "-"))].setdefault(record["mechanism"],
                                                                                 record["loss_curve"])
    for (task, label), by_mechanism in curves.items():
        figure, axis = plt.subplots(figsize=(6, 4))
        for mechanism, curve in sorted(by_mechanism.items()):
            axis.plot([p[0] for p in curve], [p[1] for p in curve], label=mechanism)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
        axis.set_title(f"{task} ({label}): training loss (first seed)")
        axis.legend(fontsize=7)
        images.append((f"{task} ({label}): training loss curves", _png(figure)))
    return images


def _speed_section(run_dir: Path) -> tuple[str, str] | None:
    if not (run_dir / "speed.jsonl").exists():
        return None
    from attnlab.bench.speed_report import render_speed_section  # matplotlib only for folders with speed rows

    return render_speed_section(run_dir)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:nth-child(2),th:nth-child(2),td:nth-child(3){text-align:left}img{max-width:100%}figure{margin:1em 0}
figcaption{color:#555;font-size:.9em}"""


def write_report(run_dir: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``leaderboard.md`` into ``run_dir``; returns their paths.

    Raises ``FileNotFoundError`` when the folder holds neither ``results.jsonl`` nor ``speed.jsonl``.
    """
    run_dir = Path(run_dir)
    records = load_results(run_dir / "results.jsonl")
    speed = _speed_section(run_dir)
    if not records and speed is None:
        raise FileNotFoundError(f"{run_dir} holds no results.jsonl or speed.jsonl to report on")
    title = title or f"attnlab report: {run_dir.name}"
    rows = aggregate(records)
    markdown = leaderboard_markdown(rows, title=title) if rows else f"# {title}\n"
    if speed is not None:
        markdown += "\n## Speed\n\n" + speed[1] + "\n"
    leaderboard = run_dir / "leaderboard.md"
    leaderboard.write_text(markdown, encoding="utf-8")

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if rows:
        versions = records[-1].get("versions", {})
        parts.append(f"<p>{len(records)} runs; versions: {html.escape(str(versions))}</p>")
        parts.append(markdown_to_html(leaderboard_markdown(rows, title=title)))
        for caption, data in _plots(rows, records):
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if speed is not None:
        parts.append("<h2>Speed</h2>" + speed[0])
    parts.append("</body></html>")
    report = run_dir / "report.html"
    report.write_text("\n".join(parts), encoding="utf-8")
    return report, leaderboard
