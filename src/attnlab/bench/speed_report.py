"""Tables and log-log plots of a speed benchmark folder (``speed.jsonl``), as Markdown and HTML.

``render_speed_section(run_dir)`` returns ``(html_fragment, markdown)``: the HTML embeds the plots
(PNG, base64; one figure per mode for time, time relative to softmax and peak memory versus N, legends
outside the axes) and the tables of absolute figures with ratios to softmax attention (SDPA) measured
in the same run, the fitted exponent of N per series, and where each mechanism overtakes softmax.

Memory cells say what was measured: MiB above the process's resident set before the inputs were built,
"< 0.25" below the measurement's resolution, "not measured" where it was not (never 0 or "-").
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attnlab.bench.markdown_html import markdown_to_html
from attnlab.bench.memory import MEMORY_RESOLUTION_BYTES
from attnlab.bench.results import load_results, result_key
from attnlab.bench.scaling import scaling_exponents
from attnlab.bench.speed_config import BASELINE, KEY_FIELDS, RESULTS_FILE
from attnlab.files import atomic_write_bytes, atomic_write_text

__all__ = ["load_speed_rows", "speed_tables_markdown", "speed_plots", "render_speed_section", "write_speed_report",
           "memory_text", "memory_ratio", "crossover_lines", "LENGTH_CAP_REASON", "TIME_BUDGET_REASON"]

LENGTH_CAP_REASON = "length cap:"  # how the reason of a cell skipped by the preset's length cap starts
TIME_BUDGET_REASON = "time budget:"  # ... and of one left out because the sweep's time budget was spent

Series = tuple[str, str, str, bool]  # (mechanism, impl, mode, causal)


def load_speed_rows(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The speed rows of ``run_dir/speed.jsonl`` (last row per cell), each with its ratios to softmax."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in load_results(Path(run_dir) / RESULTS_FILE):
        if row.get("kind") == "speed":
            latest[result_key(row, KEY_FIELDS)] = row
    rows = list(latest.values())
    base = {_setting(r): r for r in rows if r["mechanism"] == BASELINE and r["impl"] == "auto" and r["path"] == "op"}
    for row in rows:
        b = base.get(_setting(row), {})
        ok = row.get("status") == "ok" and b.get("status") == "ok"
        row["time_ratio"] = row["time_ms"] / b["time_ms"] if ok and b.get("time_ms") else None
        row["memory_ratio"] = memory_ratio(row, b) if ok else None
    return rows


def _resolved(row: Mapping[str, Any]) -> bool:
    peak = row.get("peak_bytes")
    return isinstance(peak, int | float) and peak >= MEMORY_RESOLUTION_BYTES


def memory_ratio(row: Mapping[str, Any], base: Mapping[str, Any]) -> float | None:
    """``row``'s peak memory over ``base``'s, where both are measured above the resolution (else ``None``)."""
    return row["peak_bytes"] / base["peak_bytes"] if _resolved(row) and _resolved(base) else None


def memory_text(row: Mapping[str, Any], *, unit: bool = True) -> str:
    """A cell's memory figure as shown: "12.5 MiB", "< 0.25 MiB" (not resolved) or "not measured"."""
    peak = row.get("peak_bytes")
    suffix = " MiB" if unit else ""
    if not isinstance(peak, int | float):
        return "not measured"
    if peak < MEMORY_RESOLUTION_BYTES:
        return f"< {MEMORY_RESOLUTION_BYTES / 2**20:g}{suffix}"
    return _fmt_mib(peak) + suffix


def crossover_lines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Per series (and mode) other than the baseline: from which N on it is faster than softmax timed in
    the same run, e.g. "lightning fwd: faster than softmax from N=512 on (x0.21 at N=8192)"."""
    lines = []
    for (name, impl, mode, causal), cells in _series(rows).items():
        if name == BASELINE and impl == "auto":
            continue
        points = sorted((n, r["time_ratio"]) for n, r in cells.items()
                        if r.get("status") == "ok" and r.get("time_ratio") is not None)
        if not points:
            continue
        # softmax's layer row is the layers' baseline: named as such, not "softmax ... than softmax"
        plain = impl in ("auto", "external") or (impl == "layer" and name != BASELINE)
        label = name if plain else f"{name} ({impl})"
        label += f" {mode}" + ("" if causal else " (bidirectional)")
        last_n, last_ratio = points[-1]
        tail = f"x{last_ratio:.2f} at N={last_n}"
        since = None
        for n, ratio in reversed(points):
            if ratio >= 1:
                break
            since = n
        if since is None:
            lines.append(f"{label}: not faster than softmax up to N={last_n} ({tail})")
        elif since == points[0][0]:
            lines.append(f"{label}: faster than softmax at every length measured, N={since}..{last_n} ({tail})")
        else:
            lines.append(f"{label}: faster than softmax from N={since} on ({tail})")
    return lines


def _setting(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in ("N", "mode", "causal", "batch", "heads", "dim", "dtype", "device"))


def _series(rows: Iterable[Mapping[str, Any]]) -> dict[Series, dict[int, Mapping[str, Any]]]:
    out: dict[Series, dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault((row["mechanism"], row["impl"], row["mode"], bool(row["causal"])), {})[row["N"]] = row
    return dict(sorted(out.items(), key=lambda kv: (kv[0][2], kv[0][0] != BASELINE, kv[0][0], kv[0][1],
                                                    not kv[0][3])))


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_mib(nbytes: float) -> str:
    mib = nbytes / 2**20
    return f"{mib:.3g}" if mib < 1000 else f"{mib:.0f}"


def _cell_text(row: Mapping[str, Any] | None, what: str) -> str:
    if row is None:
        return ""
    status = row.get("status")
    if status == "skipped":
        reason = str(row.get("reason"))
        if reason.startswith(LENGTH_CAP_REASON):
            return "not run (length cap)"
        if reason.startswith(TIME_BUDGET_REASON):
            return "not run (time budget)"
        estimate = row.get("estimate_bytes")
        return f"skipped (est. {estimate / 2**30:.1f} GiB)" if "GiB" in reason else "skipped (slow)"
    if status != "ok":
        return "error"
    if what == "time":
        ratio = row.get("time_ratio")
        return _fmt_ms(row["time_ms"]) + (f" (x{ratio:.2f})" if ratio is not None else "")
    ratio = row.get("memory_ratio")
    return memory_text(row, unit=False) + (f" (x{ratio:.2f})" if ratio is not None else "")


def _settings_line(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    r = rows[0]
    batches = sorted({x["batch"] for x in rows})
    batch = f"B={batches[0]}" if len(batches) == 1 else "B=" + "/".join(str(b) for b in batches)
    return (f"{r.get('device_name', r['device'])}, {r['dtype']}, {batch}, H={r['heads']}, D={r['dim']}, "
            f"torch {r.get('torch', '?')}")


def speed_tables_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Two Markdown tables (time in ms, peak memory in MiB), each cell with its ratio to softmax."""
    if not rows:
        return "_no speed results_\n"
    lengths = sorted({r["N"] for r in rows})
    fits = scaling_exponents(rows)
    series = _series(rows)
    methods = sorted({str(r["memory_method"]) for r in rows if r.get("status") == "ok" and r.get("memory_method")})
    parts = [f"Settings: {_settings_line(rows)}. Ratios (xR) are to softmax attention (SDPA, impl \"auto\") "
             f"timed in the same run; the exponent is the least-squares slope of log(value) against log(N).\n",
             f"Memory: {'; '.join(methods) or 'not measured'}. A figure is the peak above the process's resident "
             f"set read before the inputs were built (inputs included); \"< {MEMORY_RESOLUTION_BYTES / 2**20:g}\" is "
             "below what the measurement resolves (the allocator may reuse memory it holds); \"not measured\" "
             "where no figure was taken.\n"]
    crossings = crossover_lines(rows)
    if crossings:
        parts.append("Where each mechanism overtakes softmax (time ratio below 1 from that N on):\n\n"
                     + "\n".join(f"- {line}" for line in crossings) + "\n")
    for what, unit in (("time", "ms"), ("memory", "MiB")):
        header = ["mechanism", "impl", "mode", "causal", *[f"N={n}" for n in lengths], f"{what} exponent"]
        lines = [f"**{'Time per call' if what == 'time' else 'Peak memory'} ({unit})**", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (name, impl, mode, causal), cells in series.items():
            fit = fits.get((name, impl, mode, causal), {}).get(what)
            lines.append("| " + " | ".join([
                name, impl, mode, "yes" if causal else "no",
                *[_cell_text(cells.get(n), what) for n in lengths],
                "-" if fit is None else f"{fit:.2f}",
            ]) + " |")
        parts.append("\n".join(lines) + "\n")
    grouped = {LENGTH_CAP_REASON: "the preset's length cap, to fit its time budget",
               TIME_BUDGET_REASON: "the sweep's time budget was spent; rerun the same command to add them"}
    notes = []
    for start, why in grouped.items():
        left = [r for r in rows if r.get("status") == "skipped" and str(r.get("reason")).startswith(start)]
        if left:
            names = ", ".join(sorted({r["mechanism"] for r in left}))
            notes.append(f"- not run at N={', '.join(map(str, sorted({r['N'] for r in left})))} ({why}): {names}")
    notes += [f"- {r['mechanism']} ({r['impl']}, {r['mode']}, N={r['N']}): {r.get('status')}: {r.get('reason')}"
              for r in rows if r.get("status") in ("error", "skipped")
              and not str(r.get("reason")).startswith(tuple(grouped))]
    if notes:
        parts.append("Skipped or failed cells:\n\n" + "\n".join(notes) + "\n")
    return "\n".join(parts)


def _label(name: str, impl: str, causal: bool) -> str:
    label = name if impl in ("auto", "layer", "external") else f"{name} ({impl})"
    return label + ("" if causal else " (bidirectional)")


def speed_plots(rows: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of one log-log figure per (quantity, mode) versus N: "time_fwd", "ratio_fwd" (time over
    softmax's, with the line where they are equal), "memory_fwd", and the same for "fwdbwd".

    One colour and line style per (mechanism, impl) in every figure; softmax in thick black; the legend
    to the right of the axes. A figure lists in its title the series it has no point for.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    modes = sorted({r["mode"] for r in rows}) or ["fwd"]
    series = _series(rows)
    out: dict[str, bytes] = {}
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", ":", "-.")
    names = list(dict.fromkeys((name, impl) for (name, impl, _, _) in series))
    quantities = (("time", "time per call (ms)"), ("ratio", "time / softmax's time (same N, same run)"),
                  ("memory", "peak memory above the process's (MiB)"))
    for mode in modes:
        for what, axis_label in quantities:
            fig, ax = plt.subplots(figsize=(7.5, 4.8))
            missing = []
            for (name, impl, m, causal), cells in series.items():
                if m != mode:
                    continue
                baseline = name == BASELINE and impl == "auto"
                if what == "ratio" and baseline:
                    continue
                ok = [(n, r) for n, r in sorted(cells.items()) if r.get("status") == "ok"]
                if what == "time":
                    points = [(n, r["time_ms"]) for n, r in ok if r.get("time_ms")]
                elif what == "ratio":
                    points = [(n, r["time_ratio"]) for n, r in ok if r.get("time_ratio")]
                else:
                    points = [(n, r["peak_bytes"] / 2**20) for n, r in ok if _resolved(r)]
                if not points:
                    missing.append(_label(name, impl, causal))
                    continue
                index = names.index((name, impl))
                style: dict[str, Any] = {"color": colors[index % len(colors)],
                                         "linestyle": styles[(index // len(colors)) % len(styles)]}
                if baseline:
                    style = {"linewidth": 2.5, "color": "black" if causal else "gray"}
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                        label=_label(name, impl, causal), **style)
            if what == "ratio":
                ax.axhline(1.0, color="black", linewidth=1.5)
                ax.text(0.01, 0.02, "below the line: faster than softmax", transform=ax.transAxes, fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(axis_label)
            title = {"time": "time vs N", "ratio": "time relative to softmax vs N", "memory": "peak memory vs N"}[what]
            ax.set_title(f"{title}, {'forward' if mode == 'fwd' else 'forward + backward'}\n{_settings_line(rows)}",
                         fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if missing:
                fig.text(0.01, -0.02, "no point: " + ", ".join(missing), fontsize=8, wrap=True)
            if ax.get_legend_handles_labels()[0]:  # (the ratio plot's line at 1 has no label)
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            out[f"{what}_{mode}"] = buffer.getvalue()
    return out


def render_speed_section(run_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """``(html_fragment, markdown)`` for the speed results in ``run_dir/speed.jsonl``.

    The HTML holds the two log-log plots (time and peak memory versus N, embedded PNG) and the
    ratio tables; the Markdown holds the tables. Neither has a heading (the caller's report gives
    the section its title). An empty folder gives a short note in both.
    """
    rows = load_speed_rows(run_dir)
    markdown = speed_tables_markdown(rows)
    if not rows:
        return "<section class=\"speed\"><p>no speed results</p></section>", markdown
    images = "".join(
        f'<figure><img alt="{what.replace("_", " ")} versus N (log-log)" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for what, png in speed_plots(rows).items()
    )
    body = markdown_to_html(speed_tables_markdown(rows), table_class="speed")
    fragment = f'<section class="speed">\n<div class="plots">{images}</div>\n{body}\n</section>'
    return fragment, markdown


def write_speed_report(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``speed.md``, ``speed.html`` and the two PNG plots into ``run_dir``; return their paths."""
    run_dir = Path(run_dir)
    fragment, markdown = render_speed_section(run_dir)
    style = ("body{font-family:sans-serif;margin:2em}table.speed{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%;margin:4px}")
    written = [atomic_write_text(run_dir / "speed.md", "# Speed and memory\n\n" + markdown),
               atomic_write_text(run_dir / "speed.html",
                                 f"<!doctype html><html><head><meta charset=\"utf-8\"><title>attnlab speed</title>"
                                 f"<style>{style}</style></head><body><h1>Speed and memory</h1>{fragment}"
                                 "</body></html>")]
    rows = load_speed_rows(run_dir)
    if rows:
        for what, png in speed_plots(rows).items():
            written.append(atomic_write_bytes(run_dir / f"speed_{what}.png", png))
    return written
