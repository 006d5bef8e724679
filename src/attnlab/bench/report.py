"""``attnlab report runs/NAME`` for a quality run: ``report.html`` (self-contained) and ``leaderboard.md``.

Reads ``results.jsonl`` (quality runs) and, when present, ``speed.jsonl`` (its section comes from
:func:`attnlab.bench.speed_report.render_speed_section`). What a table says, and how:

- **One record per run.** Records are de-duplicated on (task, config, mechanism, lr, seed): an ok run
  wins over a failed one, then the latest (:func:`attnlab.bench.results.deduplicate`).
- **The learning rate** follows zoology's protocol ("Zoology: Measuring and Improving Recall in
  Efficient Language Models", arXiv 2312.04927): per (task, variant, mechanism) the rate with the best
  mean *validation* value over seeds (a non-finite or failed seed makes a rate's mean the worst) is
  chosen, and the row reports the *test* metric at that rate, with the rate. Equal validation means
  go to the lower rate. Records without a validation value (written before the split existed) with a
  single rate take that rate; with several rates they cannot be chosen between honestly, so each rate
  gets its own row. A table whose runs trained at one rate says "one learning rate, not swept".
- **Statistics.** Two or more seeds: mean ± sample standard deviation, and the 95% interval of the
  mean from Student's t distribution with n - 1 degrees of freedom (``report.html`` only). One seed:
  the value alone (no ±: a spread of one sample is not zero, it is unknown). A NaN or infinite metric
  in any seed is stated ("nan in 1 of 3 seeds") and ranks the row after every finite one. Failed runs
  are rows that say so, with their error, ranked after everything that produced a value.
- **Ranks** are competition ranks over the value as displayed (4 decimals): equal values share a rank
  (1, 2, 2, 4).
"""

from __future__ import annotations

import html
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.bench.markdown_html import markdown_to_html
from attnlab.bench.results import QUALITY_RECORD_KEY, deduplicate, is_ok, read_results
from attnlab.files import atomic_write_text

__all__ = ["Row", "aggregate", "leaderboard_markdown", "print_leaderboard", "write_report", "state_size_of",
           "quality_records", "t_quantile_975", "ranks", "value_text", "ONE_RATE_NOTE"]

ONE_RATE_NOTE = "one learning rate, not swept"
DIGITS_IMAGE_SIZE = 8  # scikit-learn's digits are 8 x 8 pixels

# Student's t 0.975 quantiles for 1..30 degrees of freedom (the two-sided 95% interval); beyond 30 the
# Cornish-Fisher expansion around the normal quantile below is accurate to better than 1e-4.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959963984540054


def t_quantile_975(degrees_of_freedom: int) -> float:
    """The 0.975 quantile of Student's t distribution (half-width factor of a two-sided 95% interval)."""
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom={degrees_of_freedom}: the t distribution needs at least 1")
    if degrees_of_freedom <= len(_T975):
        return _T975[degrees_of_freedom - 1]
    z, nu = _Z975, float(degrees_of_freedom)
    return (z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3))


@dataclass
class Row:
    """One (task, variant, mechanism) line of a leaderboard, at its chosen learning rate.

    ``values`` are the test metric of the seeds that finished at that rate (non-finite ones included);
    ``failures`` the (seed, error) of those that failed there (all of the group's when none finished).
    """

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
    seeds: list[int] = field(default_factory=list)
    lr: float | None = None
    rates_run: list[float] = field(default_factory=list)
    swept: bool = False
    lr_choice: str = ONE_RATE_NOTE
    validation_mean: float | None = None
    train_step_s: float | None = None
    failures: list[tuple[int, str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    loss_curve: list[list[float]] | None = None

    @property
    def failed(self) -> bool:
        """No seed produced a value."""
        return not self.values

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]

    @property
    def all_finite(self) -> bool:
        return bool(self.values) and len(self.finite) == len(self.values)

    @property
    def mean(self) -> float:
        """Mean over seeds; NaN for a failed row, and the mean (so NaN or +-inf) of a non-finite one."""
        if not self.values:
            return math.nan
        try:
            return statistics.fmean(self.values)
        except (ValueError, OverflowError):  # inf + -inf
            return math.nan

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; ``None`` with fewer than two finite seeds (unknown)."""
        if not self.all_finite or len(self.values) < 2:
            return None
        return statistics.stdev(self.values)

    def interval95(self) -> tuple[float, float] | None:
        """The 95% t interval of the mean over seeds (n - 1 degrees of freedom); ``None`` below 2 seeds."""
        std = self.std
        if std is None:
            return None
        half = t_quantile_975(len(self.values) - 1) * std / math.sqrt(len(self.values))
        return self.mean - half, self.mean + half


def state_size_of(record: dict[str, Any]) -> tuple[float | None, str]:
    """(floats of state per sequence, "recurrent" | "kv-cache" | "n/a").

    Recurrent mechanisms report their state; for the others (softmax and friends) the cache a decoder
    keeps grows with the sequence: ``2 * N * dim * depth`` floats, as zoology plots it (for the digits
    ViT, an encoder, the keys and values its layers hold over the image's N patches). A local mechanism
    (``window`` or ``kernel_size`` in its ``mixer_options``, plus any ``sink_tokens``) keeps only that
    many keys and values.
    """
    if record.get("state_size") is not None:
        return float(record["state_size"]), "recurrent"
    config = record.get("config", {})
    length = config.get("seq_len") or config.get("length")
    dim, depth = config.get("dim"), config.get("depth", 1)
    if record.get("task") == "incontext_regression" and dim is not None:
        length, dim = config.get("length", 0) + 1, config.get("heads", 1) * (dim + 1)
    if record.get("task") == "digits" and config.get("patch_size"):
        length = (DIGITS_IMAGE_SIZE // int(config["patch_size"])) ** 2  # the ViT's tokens: one per patch
    options = record.get("mixer_options") or {}
    span = options.get("window", options.get("kernel_size"))
    if length and isinstance(span, int) and span > 0:  # a local mechanism keeps only the keys it can still see
        sinks = options.get("sink_tokens")
        length = min(length, span + (sinks if isinstance(sinks, int) else 0))
    if length and dim:
        return float(2 * length * dim * depth), "kv-cache"
    return None, "n/a"


def quality_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The quality-benchmark records among ``records`` (ok or failed), one per run (see the module doc)."""
    return deduplicate(_quality_candidates(records), QUALITY_RECORD_KEY)


def _quality_candidates(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "task" in r and "mechanism" in r
            and (("value" in r and "metric" in r) or not is_ok(r))]


def _rate(record: dict[str, Any]) -> float | None:
    rate = record.get("lr", record.get("config", {}).get("lr"))
    return float(rate) if isinstance(rate, int | float) else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _error(record: dict[str, Any]) -> str:
    text = str(record.get("error") or "failed (no error recorded)").strip().splitlines()
    return text[-1] if text else "failed"


def _validation_score(runs: Sequence[dict[str, Any]], higher_is_better: bool) -> tuple[bool, float]:
    """Sort key of one rate (larger is better): a failed or non-finite seed makes the rate the worst."""
    values = [_number(r.get("validation_value")) if is_ok(r) else math.nan for r in runs]
    if not values or not all(math.isfinite(v) for v in values):
        return (False, 0.0)
    mean = statistics.fmean(values)
    return (True, mean if higher_is_better else -mean)


def _make_row(task: str, label: str, mechanism: str, runs: Sequence[dict[str, Any]], *, lr: float | None,
              rates: list[float], swept: bool, choice: str, all_failed: Sequence[dict[str, Any]]) -> Row:
    ok = sorted((r for r in runs if is_ok(r)), key=lambda r: r.get("seed", 0))
    failed = [r for r in (runs if ok else all_failed) if not is_ok(r)]
    first = ok[0] if ok else (all_failed[0] if all_failed else runs[0])
    size, kind = state_size_of(first)
    extras: dict[str, float] = {}
    for key in ("baseline_ridge", "baseline_debiased_gd_one_step", "ratio_to_debiased_gd"):
        values = [r.get("metrics", {}).get(key) for r in ok]
        if values and all(isinstance(v, int | float) for v in values):
            extras[key] = statistics.fmean(values)
    steps = [_number(r.get("train_step_s")) for r in ok]
    validation = [_number(r.get("validation_value")) for r in ok]
    return Row(task, label, mechanism, first.get("family", "-"), first.get("metric", "-"),
               bool(first.get("higher_is_better", True)), [_number(r.get("value")) for r in ok],
               int(first.get("parameters", 0) or 0), size, kind,
               statistics.fmean(_number(r.get("wall_time_s", 0.0)) for r in ok) if ok else math.nan, extras,
               seeds=[int(r.get("seed", 0)) for r in ok], lr=lr, rates_run=rates, swept=swept, lr_choice=choice,
               validation_mean=statistics.fmean(validation) if validation and all(map(math.isfinite, validation))
               else None,
               train_step_s=statistics.fmean(steps) if steps and all(map(math.isfinite, steps)) else None,
               failures=[(int(r.get("seed", 0)), _error(r)) for r in failed], config=dict(first.get("config", {})),
               loss_curve=ok[0].get("loss_curve") if ok else None)


def _rows_of_group(task: str, label: str, mechanism: str, group: list[dict[str, Any]]) -> list[Row]:
    by_rate: dict[float | None, list[dict[str, Any]]] = defaultdict(list)
    for record in group:
        by_rate[_rate(record)].append(record)
    planned = {float(v) for r in group for v in (r.get("sweep") or []) if isinstance(v, int | float)}
    rates = sorted(r for r in by_rate if r is not None)
    swept = len(set(rates) | planned) > 1
    finished = [rate for rate, runs in by_rate.items() if any(is_ok(r) for r in runs)]
    higher = bool(group[0].get("higher_is_better", True))
    if not finished:  # nothing produced a value: one failed row, every failure listed
        return [_make_row(task, label, mechanism, [], lr=None, rates=rates, swept=swept, choice="every run failed",
                          all_failed=group)]
    if len(finished) == 1:
        rate = finished[0]
        choice = "not swept" if not swept else f"the only rate that finished ({len(rates)} tried)"
        return [_make_row(task, label, mechanism, by_rate[rate], lr=rate, rates=rates, swept=swept, choice=choice,
                          all_failed=group)]
    has_validation = any(isinstance(r.get("validation_value"), int | float) for r in group if is_ok(r))
    if not has_validation:  # older records: choosing on the test metric would flatter every mechanism
        return [_make_row(task, label, f"{mechanism} (lr {_rate_text(rate)})", by_rate[rate], lr=rate, rates=rates,
                          swept=swept, choice="no validation values: every rate shown", all_failed=group)
                for rate in sorted(finished, key=lambda r: (r is None, r or 0.0))]
    # rates are compared on the seeds they all ran (a mean over more seeds is not comparable with one over
    # fewer, e.g. a second seed added at the chosen rate only); with none in common, on all their seeds
    seeds = {rate: {r.get("seed") for r in by_rate[rate]} for rate in finished}
    common = set.intersection(*seeds.values())
    best = max(finished, key=lambda rate: (_validation_score(
        [r for r in by_rate[rate] if r.get("seed") in common] or by_rate[rate], higher), -(rate or 0.0)))
    planned_text = f" of {len(planned)} planned" if len(planned) > len(rates) else ""
    choice = f"best validation mean of {len(rates)} rates{planned_text}"
    if common and any(ran != common for ran in seeds.values()):
        choice += f" on the seeds all of them ran ({', '.join(str(s) for s in sorted(common))})"
    return [_make_row(task, label, mechanism, by_rate[best], lr=best, rates=rates, swept=True, choice=choice,
                      all_failed=group)]


def ranks(rows: Sequence[Row]) -> list[str]:
    """Competition ranks of rows already in leaderboard order: equal displayed values share a rank
    (1, 2, 2, 4); non-finite rows share the rank after the finite ones; failed rows get "-"."""
    out: list[str] = []
    finite = [r for r in rows if r.all_finite]
    previous: str | None = None
    current = 0
    for position, row in enumerate(rows, 1):
        if row.failed:
            out.append("-")
        elif not row.all_finite:
            out.append(str(len(finite) + 1))
        else:
            shown = _fmt(row.mean)
            if shown != previous:
                current, previous = position, shown
            out.append(str(current))
    return out


def _order(row: Row) -> tuple[Any, ...]:
    status = 0 if row.all_finite else (1 if row.values else 2)
    score = row.mean if row.all_finite else 0.0
    # the displayed value sorts, so that rows shown equal are adjacent and share a rank
    score = float(_fmt(score)) if math.isfinite(score) and abs(score) < 1e12 else score
    return (row.task, row.config_label, status, -score if row.higher_is_better else score, row.mechanism)


def aggregate(records: Iterable[dict[str, Any]]) -> list[Row]:
    """Rows per (task, variant, mechanism) at the chosen rate, sorted by task, variant, then best first."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in quality_records(records):
        groups[(record["task"], record.get("config_label", "-"), record["mechanism"])].append(record)
    rows = [row for (task, label, mechanism), group in groups.items()
            for row in _rows_of_group(task, label, mechanism, group)]
    # a failed run's record holds the job, not the task's metric or the mechanism's family: take them from
    # the runs of the same task / mechanism that finished
    metrics = {r.task: (r.metric, r.higher_is_better) for r in rows if not r.failed}
    families = {r.mechanism: r.family for r in rows if not r.failed}
    for row in rows:
        if row.failed:
            row.metric, row.higher_is_better = metrics.get(row.task, (row.metric, row.higher_is_better))
            row.family = families.get(row.mechanism, row.family)
    return sorted(rows, key=_order)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _rate_text(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:g}"


def value_text(row: Row) -> str:
    """The metric cell: mean ± std (2+ seeds), the value (1 seed), the non-finite count, or the failure."""
    if row.failed:
        return f"failed: {row.failures[0][1]}" if row.failures else "failed"
    n = len(row.values)
    if not row.all_finite:
        bad = [v for v in row.values if not math.isfinite(v)]
        kinds = sorted({str(v) for v in bad})
        what = kinds[0] if len(kinds) == 1 else "non-finite value"
        text = f"{what} in {len(bad)} of {n} seed{'s' if n > 1 else ''}"
    elif n == 1:
        text = _fmt(row.values[0])
    else:
        text = f"{_fmt(row.mean)} ± {_fmt(row.std or 0.0)}"
    if row.failures:
        text += f" ({len(row.failures)} more seed{'s' if len(row.failures) > 1 else ''} failed)"
    return text


def _interval_text(row: Row) -> str:
    interval = row.interval95()
    return "-" if interval is None else f"[{_fmt(interval[0])}, {_fmt(interval[1])}]"


def _by_table(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    tables: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        tables[(row.task, row.config_label)].append(row)
    return tables


def _table_notes(group: Sequence[Row]) -> list[str]:
    """The sentences under a table's heading: metric and direction, how the rate was chosen, the seeds."""
    first = group[0]
    direction = "higher is better" if first.higher_is_better else "lower is better"
    lines = [f"Metric: {first.metric} on the test set ({direction})."]
    if not any(r.swept for r in group):
        rates = sorted({r.lr for r in group if r.lr is not None})
        lines.append(f"Learning rate: {ONE_RATE_NOTE} ({', '.join(_rate_text(r) for r in rates) or 'unknown'}).")
    else:
        rates = sorted({rate for r in group for rate in r.rates_run})
        lines.append(f"Learning rate: swept over {', '.join(_rate_text(r) for r in rates)}; each row reports the "
                     "test metric at the rate with the best mean validation value over seeds (column lr).")
        tried: dict[tuple[float, ...], list[str]] = defaultdict(list)
        for row in group:
            tried[tuple(row.rates_run)].append(row.mechanism)
        if len(tried) > 1:  # a partial sweep must not read as the whole one
            lines.append("Not every row tried every rate: " + "; ".join(
                f"{', '.join(names)}: {', '.join(_rate_text(r) for r in rates) or 'none finished'}"
                for rates, names in tried.items()) + ".")
    counts = {len(r.values) for r in group if not r.failed}
    if counts == {1}:
        lines.append("One seed per row: the value of that seed (no spread measured).")
    elif counts and min(counts) >= 2:
        lines.append("Mean ± sample standard deviation over seeds.")
    elif counts:
        lines.append("Mean ± sample standard deviation over seeds for rows with two or more; one seed's value "
                     "otherwise.")
    return lines


def leaderboard_markdown(rows: Sequence[Row], *, title: str = "Leaderboard", interval: bool = False) -> str:
    """One markdown table per (task, variant), best mechanism first; ``interval`` adds the 95% t interval."""
    lines = [f"# {title}", ""]
    for (task, label), group in _by_table(rows).items():
        first = group[0]
        swept = "learning rate swept" if any(r.swept for r in group) else ONE_RATE_NOTE
        lines += [f"## {task} ({label}): {swept}", "", " ".join(_table_notes(group))]
        if interval:
            lines[-1] += (" 95% interval: mean ± t(0.975, n - 1) × std / √n, Student's t over seeds "
                          "(rows with two or more seeds).")
        lines.append("")
        ci = " 95% interval (t) |" if interval else ""
        lines += [f"| rank | mechanism | family | {first.metric} |{ci} seeds | lr | parameters | state size | "
                  "step (ms) | time (s) |",
                  "|---:|---|---|---:|" + ("---:|" if interval else "") + "---:|---:|---:|---:|---:|---:|"]
        for rank, row in zip(ranks(group), group, strict=True):
            state = "-" if row.state_size is None else f"{row.state_size:.0f}" + (
                " (KV cache)" if row.state_size_kind == "kv-cache" else "")
            step = "not recorded" if row.train_step_s is None else f"{1000 * row.train_step_s:.1f}"
            wall = "-" if not math.isfinite(row.wall_time_s) else f"{row.wall_time_s:.1f}"
            cells = [rank, row.mechanism, row.family, value_text(row)] + ([_interval_text(row)] if interval else [])
            cells += [str(len(row.values)), _rate_text(row.lr), f"{row.parameters:,}", state, step, wall]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        failures = [(row.mechanism, seed, error) for row in group for seed, error in row.failures]
        if failures:
            lines.append("")
            lines += [f"- failed: {mechanism}, seed {seed}: {error}" for mechanism, seed, error in failures]
        if "baseline_ridge" in first.extras:
            ridge, dgd = first.extras["baseline_ridge"], first.extras.get("baseline_debiased_gd_one_step", math.nan)
            lines += ["", f"Baselines on the same test prompts: ridge (Bayes-optimal) {_fmt(ridge)}, best one-step "
                          f"debiased gradient descent {_fmt(dgd)}."]
        lines.append("")
    return "\n".join(lines)


def print_leaderboard(records: Sequence[dict[str, Any]], console: Any) -> None:
    """Print one table per (task, variant) to ``console`` (a ``rich.console.Console``), best first."""
    from rich.markup import escape
    from rich.table import Table

    for (task, label), group in _by_table(aggregate(records)).items():
        swept = "learning rate swept" if any(r.swept for r in group) else ONE_RATE_NOTE
        table = Table(title=f"{task} ({label}): {group[0].metric}, {swept}",
                      caption=escape(" ".join(_table_notes(group))))
        for column in ("rank", "mechanism", "family", group[0].metric, "seeds", "lr", "params", "time (s)"):
            table.add_column(column)
        for rank, row in zip(ranks(group), group, strict=True):
            table.add_row(rank, escape(row.mechanism), row.family, escape(value_text(row)), str(len(row.values)),
                          _rate_text(row.lr), f"{row.parameters:,}",
                          "-" if not math.isfinite(row.wall_time_s) else f"{row.wall_time_s:.1f}")
        console.print(table)
        for row in group:
            for seed, error in row.failures:
                console.print(f"  failed: {escape(row.mechanism)}, seed {seed}: {escape(error)}")
        if "baseline_ridge" in group[0].extras:
            console.print(f"  baselines: ridge {group[0].extras['baseline_ridge']:.4f}, one-step debiased GD "
                          f"{group[0].extras.get('baseline_debiased_gd_one_step', math.nan):.4f}")


def _speed_section(run_dir: Path) -> tuple[str, str] | None:
    if not (run_dir / "speed.jsonl").exists():
        return None
    from attnlab.bench.speed_report import render_speed_section  # matplotlib only for folders with speed rows

    return render_speed_section(run_dir)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:nth-child(2),th:nth-child(2),td:nth-child(3){text-align:left}img{max-width:100%}figure{margin:1em 0}
figcaption{color:#555;font-size:.9em}.note{color:#555;font-size:.9em}"""


def write_report(run_dir: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``leaderboard.md`` of a quality and/or speed folder; returns their paths.

    Both files go through a temporary file and a rename. Unreadable lines of ``results.jsonl`` are listed
    in the report. Raises ``FileNotFoundError`` when the folder holds no quality records and no
    ``speed.jsonl`` (``attnlab report`` recognises the other kinds of folder before calling this).
    """
    run_dir = Path(run_dir)
    stored = read_results(run_dir / "results.jsonl")
    records = quality_records(stored.records)
    speed = _speed_section(run_dir)
    if not records and speed is None:
        raise FileNotFoundError(f"{run_dir} holds no quality results (results.jsonl) or speed.jsonl to report on")
    title = title or f"attnlab report: {run_dir.name}"
    rows = aggregate(records)
    problems = [f"results.jsonl line {number}: {reason}" for number, reason in stored.problems]
    markdown = leaderboard_markdown(rows, title=title) if rows else f"# {title}\n"
    if problems:
        markdown += "\n## Unreadable lines (left out)\n\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    if speed is not None:
        markdown += "\n## Speed\n\n" + speed[1] + "\n"
    leaderboard = atomic_write_text(run_dir / "leaderboard.md", markdown)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if rows:
        from attnlab.bench.plots_quality import quality_figures  # matplotlib only when there is a plot to draw

        versions = records[-1].get("versions", {})
        duplicates = len(_quality_candidates(stored.records)) - len(records)
        parts.append(f"<p>{len(records)} runs"
                     + (f" ({duplicates} duplicate records ignored)" if duplicates else "")
                     + f"; versions: {html.escape(str(versions))}</p>")
        parts.append(markdown_to_html(leaderboard_markdown(rows, title=title, interval=True)))
        for caption, data in quality_figures(rows):
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if problems:
        parts.append("<h2>Unreadable lines (left out)</h2>"
                     + "".join(f"<div class='note'>{html.escape(p)}</div>" for p in problems))
    if speed is not None:
        parts.append("<h2>Speed</h2>" + speed[0])
    parts.append("</body></html>")
    report = atomic_write_text(run_dir / "report.html", "\n".join(parts))
    return report, leaderboard
