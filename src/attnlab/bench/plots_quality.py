"""The figures of a quality report, as base64 PNGs for ``report.html``.

- the metric per mechanism of each table (error bars: sample std over seeds, where there are 2+);
- zoology's picture ("Zoology: Measuring and Improving Recall in Efficient Language Models", arXiv
  2312.04927, its Figure 2): the metric against the recurrent state size (the KV cache for attention)
  per mechanism across widths, one point per (mechanism, width) at its chosen learning rate;
- the quality-speed frontier: the metric against the mean time of one training step at the same shape;
- the training loss of the first seed at the chosen rate.

Every mechanism of a table appears in each of its plots, or the caption names it and says why not
(failed, a non-finite metric, no state size, no step time recorded). One panel per figure; legends sit
outside the axes, so they never cover the data.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the report imports this module to draw its rows
    from attnlab.bench.report import Row

__all__ = ["quality_figures", "mechanism_style", "missing_note", "legend_outside", "png_base64", "plain_log_ticks",
           "x_scale"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def mechanism_style(name: str, names: Sequence[str]) -> dict[str, Any]:
    """A colour and marker for ``name``, the same in every plot of one report (``names``: all of them)."""
    import matplotlib

    ordered = sorted(set(names))
    index = ordered.index(name) if name in ordered else len(ordered)
    colours = matplotlib.colormaps["tab20"].colors
    # tab20 pairs a dark and a light shade of each hue: the ten dark shades first, so that up to ten
    # mechanisms get ten distinct hues
    shade = (2 * index) % len(colours) + (index // (len(colours) // 2)) % 2
    return {"color": colours[shade], "marker": _MARKERS[(index // len(colours)) % len(_MARKERS)]}


def legend_outside(axis: Any) -> None:
    """The legend to the right of the axes (``bbox_inches='tight'`` keeps it in the image)."""
    handles, labels = axis.get_legend_handles_labels()
    if handles:
        axis.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                    ncol=1 if len(handles) <= 18 else 2, frameon=False)


def plain_log_ticks(axis: Any) -> None:
    """Tick labels of a log-scaled axis as plain numbers (``2000``, ``0.03``) instead of ``2 x 10^3``."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _: Any) -> str:  # 2 and 5 of each decade only: all eight would overlap
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0.0
        return f"{value:g}" if mantissa in (2.0, 5.0) else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def x_scale(axis: Any, values: Sequence[float]) -> None:
    """A log x axis with plain tick labels where ``values`` span 5x or more; a linear one otherwise (a log
    axis over a narrow range can show no labelled tick at all)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) >= 5 * min(finite):
        axis.set_xscale("log")
        plain_log_ticks(axis.xaxis)


def png_base64(figure: Any) -> str:
    """``figure`` as a base64 PNG (100 dpi, cropped to its content); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def missing_note(reasons: dict[str, list[str]]) -> str:
    """' Not shown: failed: a, b; no state size: c.' from {reason: mechanisms} ('' when nothing is missing)."""
    parts = [f"{reason}: {', '.join(sorted(names))}" for reason, names in reasons.items() if names]
    return f" Not shown: {'; '.join(parts)}." if parts else ""


def _unplottable(row: Row) -> str | None:
    if row.failed:
        return "failed"
    if not row.all_finite:
        return "non-finite metric"
    return None


def _error_bar(row: Row) -> float:
    return row.std if row.std is not None else 0.0


def _bars(axis: Any, group: Sequence[Row]) -> dict[str, list[str]]:
    missing: dict[str, list[str]] = defaultdict(list)
    shown = []
    for row in group:
        reason = _unplottable(row)
        if reason:
            missing[reason].append(row.mechanism)
        else:
            shown.append(row)
    shown = shown[::-1]  # best at the top
    axis.barh([r.mechanism for r in shown], [r.mean for r in shown], xerr=[_error_bar(r) for r in shown],
              color="#4c72b0")
    return missing


def _width_free(config: dict[str, Any]) -> str:
    """The config without its width and rate: the variants that differ only in those share a zoology plot."""
    return json.dumps({k: v for k, v in config.items() if k not in ("dim", "lr")}, sort_keys=True, default=str)


def _spread_sideways(points: dict[str, list[Row]]) -> dict[tuple[str, float | None], float]:
    """A factor on x per (mechanism, state size): the mechanisms sharing one state size sit 4% apart on
    the log axis, centred on the true value."""
    sharing: dict[float | None, list[str]] = defaultdict(list)
    for mechanism in sorted(points):
        for row in points[mechanism]:
            sharing[row.state_size].append(mechanism)
    return {(mechanism, size): 1.04 ** (index - (len(names) - 1) / 2)
            for size, names in sharing.items() for index, mechanism in enumerate(names)}


def quality_figures(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) pairs: per table the metric bars, the frontier and the loss curves; per task
    and shape the zoology picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.mechanism for r in rows]
    images: list[tuple[str, str]] = []
    tables: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        tables[(row.task, row.config_label)].append(row)

    for (task, label), group in tables.items():
        metric = group[0].metric
        figure, axis = plt.subplots(figsize=(7, 0.32 * len(group) + 1.5))
        missing = _bars(axis, group)
        axis.set_xlabel(metric)
        axis.set_title(f"{task} ({label})")
        images.append((f"{task} ({label}): {metric} per mechanism at its learning rate (error bars: std over "
                       f"seeds, where 2 or more).{missing_note(missing)}", png_base64(figure)))

    # zoology's picture: one figure per task and shape, widths joined by a line per mechanism
    shapes: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        shapes[(row.task, _width_free(row.config))].append(row)
    for (task, _), group in shapes.items():
        missing = defaultdict(list)
        points: dict[str, list[Row]] = defaultdict(list)
        for row in group:
            reason = _unplottable(row) or (None if row.state_size else "no state size")
            if reason:
                missing[reason].append(f"{row.mechanism} ({row.config_label})")
            else:
                points[row.mechanism].append(row)
        if not points:
            continue
        metric = group[0].metric
        figure, axis = plt.subplots(figsize=(7, 4.5))
        spread = _spread_sideways(points)
        for mechanism in sorted(points):
            mine = sorted(points[mechanism], key=lambda r: r.state_size or 0.0)
            style = mechanism_style(mechanism, names)
            axis.errorbar([(r.state_size or 0.0) * spread[(mechanism, r.state_size)] for r in mine],
                          [r.mean for r in mine], yerr=[_error_bar(r) for r in mine],
                          label=mechanism, capsize=3, linestyle="-", markersize=6, **style)
        x_scale(axis, [r.state_size or 0.0 for rows_ in points.values() for r in rows_])
        axis.set_xlabel("state size (floats per sequence; the KV cache for attention)")
        axis.set_ylabel(metric)
        labels = sorted({r.config_label for r in group})
        axis.set_title(f"{task}: {metric} vs state size")
        legend_outside(axis)
        images.append((f"{task} ({', '.join(labels)}): {metric} against state size, one point per (mechanism, "
                       "width) at its chosen learning rate, error bars std over seeds (zoology's Figure 2); points "
                       "of equal state size are spread a little sideways so that none hides another."
                       f"{missing_note(missing)}", png_base64(figure)))

    for (task, label), group in tables.items():
        missing = defaultdict(list)
        shown = []
        for row in group:
            reason = _unplottable(row) or (None if row.train_step_s else "no training-step time recorded")
            if reason:
                missing[reason].append(row.mechanism)
            else:
                shown.append(row)
        if not shown:
            continue
        metric = group[0].metric
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for row in sorted(shown, key=lambda r: r.mechanism):
            axis.errorbar([1000 * (row.train_step_s or math.nan)], [row.mean], yerr=[_error_bar(row)],
                          label=row.mechanism, capsize=3, linestyle="none", markersize=7,
                          **mechanism_style(row.mechanism, names))
        x_scale(axis, [1000 * (r.train_step_s or math.nan) for r in shown])
        axis.set_xlabel("time per training step (ms, mean over the run; same shape for every mechanism)")
        axis.set_ylabel(metric)
        axis.set_title(f"{task} ({label}): quality vs speed")
        legend_outside(axis)
        best = "up and to the left" if group[0].higher_is_better else "down and to the left"
        images.append((f"{task} ({label}): {metric} against time per training step (better is {best}; "
                       f"measured on this run's machine).{missing_note(missing)}", png_base64(figure)))

    for (task, label), group in tables.items():
        curves = [r for r in group if r.loss_curve]
        if not curves:
            continue
        missing = {"no loss curve (failed)": [r.mechanism for r in group if not r.loss_curve]}
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for row in sorted(curves, key=lambda r: r.mechanism):
            style = mechanism_style(row.mechanism, names)
            axis.plot([p[0] for p in row.loss_curve or []], [p[1] for p in row.loss_curve or []],
                      label=row.mechanism, color=style["color"])
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_yscale("log")
        axis.set_title(f"{task} ({label}): training loss")
        legend_outside(axis)
        images.append((f"{task} ({label}): training loss of the first seed at the chosen learning rate."
                       f"{missing_note(missing)}", png_base64(figure)))
    return images
