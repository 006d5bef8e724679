"""Tables and log-log plots of a speed benchmark folder (``speed.jsonl``), as Markdown and HTML.

``render_speed_section(run_dir)`` returns ``(html_fragment, markdown)``: the HTML embeds the plots
of time and peak memory versus N (PNG, base64) and the tables of absolute figures with ratios to
softmax attention (SDPA) measured in the same run, plus the fitted exponent of N per series.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attnlab.bench.markdown_html import markdown_to_html
from attnlab.bench.results import load_results, result_key
from attnlab.bench.scaling import scaling_exponents
from attnlab.bench.speed_config import BASELINE, KEY_FIELDS, RESULTS_FILE

__all__ = ["load_speed_rows", "speed_tables_markdown", "speed_plots", "render_speed_section", "write_speed_report"]

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
        row["memory_ratio"] = (row["peak_bytes"] / b["peak_bytes"]
                               if ok and row.get("peak_bytes") and b.get("peak_bytes") else None)
    return rows


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
        estimate = row.get("estimate_bytes")
        return f"skipped (est. {estimate / 2**30:.1f} GiB)" if "GiB" in str(row.get("reason")) else "skipped (slow)"
    if status != "ok":
        return "error"
    if what == "time":
        ratio = row.get("time_ratio")
        return _fmt_ms(row["time_ms"]) + (f" (x{ratio:.2f})" if ratio is not None else "")
    if not row.get("peak_bytes"):
        return "-"
    ratio = row.get("memory_ratio")
    return _fmt_mib(row["peak_bytes"]) + (f" (x{ratio:.2f})" if ratio is not None else "")


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
    parts = [f"Settings: {_settings_line(rows)}. Ratios (xR) are to softmax attention (SDPA, impl \"auto\") "
             f"timed in the same run; the exponent is the least-squares slope of log(value) against log(N).\n"]
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
    problems = [r for r in rows if r.get("status") in ("error", "skipped")]
    if problems:
        notes = [f"- {r['mechanism']} ({r['impl']}, {r['mode']}, N={r['N']}): {r.get('status')}: {r.get('reason')}"
                 for r in problems]
        parts.append("Skipped or failed cells:\n\n" + "\n".join(notes) + "\n")
    return "\n".join(parts)


def speed_plots(rows: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """PNG bytes of two log-log figures ("time", "memory") versus N, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows}) or ["fwd"]
    series = _series(rows)
    out: dict[str, bytes] = {}
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", ":", "-.")
    # one colour and line style per (mechanism, impl), the same in every panel
    names = list(dict.fromkeys((name, impl) for (name, impl, _, _) in series))
    for what, key, scale, axis_label in (("time", "time_ms", 1.0, "time per call (ms)"),
                                         ("memory", "peak_bytes", 2**-20, "peak memory (MiB)")):
        fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            for (name, impl, m, causal), cells in series.items():
                if m != mode:
                    continue
                index = names.index((name, impl))
                points = sorted((n, r[key] * scale) for n, r in cells.items() if r.get("status") == "ok" and r.get(key))
                if not points:
                    continue
                style: dict[str, Any] = {"color": colors[index % len(colors)],
                                         "linestyle": styles[(index // len(colors)) % len(styles)]}
                if name == BASELINE and impl == "auto":
                    style = {"linewidth": 2.5, "color": "black"}
                label = name if impl in ("auto", "layer", "external") else f"{name} ({impl})"
                if name == BASELINE and not causal:
                    label += " (bidirectional)"
                    style = {"linewidth": 2.5, "color": "gray"}
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label,
                        **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(axis_label)
            ax.set_title(f"{what} vs N, {'forward' if mode == 'fwd' else 'forward + backward'}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, ncol=2)
        fig.suptitle(_settings_line(rows), fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        out[what] = buffer.getvalue()
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
        f'<img alt="{what} versus N (log-log)" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        for what, png in speed_plots(rows).items()
    )
    body = markdown_to_html(speed_tables_markdown(rows), table_class="speed")
    fragment = f'<section class="speed">\n<div class="plots">{images}</div>\n{body}\n</section>'
    return fragment, markdown


def write_speed_report(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``speed.md``, ``speed.html`` and the two PNG plots into ``run_dir``; return their paths."""
    run_dir = Path(run_dir)
    fragment, markdown = render_speed_section(run_dir)
    written = [run_dir / "speed.md", run_dir / "speed.html"]
    written[0].write_text("# Speed and memory\n\n" + markdown, encoding="utf-8")
    style = ("body{font-family:sans-serif;margin:2em}table.speed{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:48%;margin:4px}")
    written[1].write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>attnlab speed</title>"
                          f"<style>{style}</style></head><body><h1>Speed and memory</h1>{fragment}</body></html>",
                          encoding="utf-8")
    rows = load_speed_rows(run_dir)
    if rows:
        for what, png in speed_plots(rows).items():
            path = run_dir / f"speed_{what}.png"
            path.write_bytes(png)
            written.append(path)
    return written
