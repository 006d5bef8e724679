"""``leaderboard.md`` and ``report.html`` of an ``attnlab eval`` run folder (from its ``results.jsonl``)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnlab.files import atomic_write_text

__all__ = ["leaderboard_markdown", "write_eval_report", "relative_to_dense"]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def relative_to_dense(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """``(label, context) -> perplexity / perplexity of softmax at that context - 1`` (absent without softmax)."""
    dense = {(r["model"], r["context"]): r["perplexity"] for r in rows if r.get("label") == "softmax"}
    return {(r["label"], r["context"]): r["perplexity"] / dense[(r["model"], r["context"])] - 1
            for r in rows if (r["model"], r["context"]) in dense}


def _rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "row"]


def leaderboard_markdown(records: Sequence[dict[str, Any]]) -> str:
    """One table per (model, context): keys per query, perplexity, change over dense, bits per byte,
    needle recall, time and memory; then the SDPA timing comparisons."""
    rows = _rows(records)
    relative = relative_to_dense(rows)
    lines = ["# attnlab eval", ""]
    for model, context in sorted({(r["model"], r["context"]) for r in rows}):
        lines += [f"## {model}, context {context}", "",
                  "| mechanism | keys/query (mean) | perplexity | vs dense | bits/byte | needle recall | "
                  "seconds | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["model"] == model and r["context"] == context),
                        key=lambda r: (r["label"] != "softmax", r["keys_attended"] or 0.0, r["label"])):
            change = relative.get((r["label"], context))
            lines.append(f"| {r['label']} | {_fmt(r['keys_attended'])} | {_fmt(r['perplexity'])} | "
                         f"{'-' if change is None else f'{100 * change:+.2f}%'} | {_fmt(r['bits_per_byte'])} | "
                         f"{_fmt(r['needle_recall'])} | {_fmt(r['seconds'], 3)} | {_fmt(r['peak_rss_mb'], 4)} |")
        lines.append("")
    timings = [r for r in records if r.get("kind") == "prefill_timing"]
    if timings:
        lines += ["## prefill: attnlab_softmax vs the model's own SDPA (interleaved, medians)", "",
                  "| model | context | SDPA s | attnlab_softmax s | ratio | repeats |", "|---|---|---|---|---|---|"]
        for r in timings:
            lines.append(f"| {r['model']} | {r['context']} | {_fmt(r['sdpa_s'])} | {_fmt(r['attnlab_softmax_s'])} | "
                         f"{r['ratio']:.3f} | {r['repeats']} |")
        lines.append("")
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]]) -> str | None:
    """Perplexity against mean keys per query, one panel per context: base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    if not contexts:
        return None
    figure, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for axis, context in zip(axes[0], contexts, strict=True):
        here = [r for r in rows if r["context"] == context and r.get("keys_attended") is not None]
        for mechanism in sorted({r["mechanism"] for r in here}):
            points = sorted((r["keys_attended"], r["perplexity"], r["label"]) for r in here
                            if r["mechanism"] == mechanism)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mechanism)
            for x, y, label in points:
                axis.annotate(label.split(":", 1)[-1] if ":" in label else "", (x, y), fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel("keys attended per query (mean, layer 0)")
        axis.set_ylabel("perplexity")
        axis.set_title(f"context {context}")
        axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _markdown_to_html(markdown: str) -> str:
    parts, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, *body = table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                   for row in body) + "</table>")
            table = []
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            parts.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
    return "".join(parts)


def write_eval_report(run_dir: str | Path, records: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``leaderboard.md`` and a self-contained ``report.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    markdown = leaderboard_markdown(records)
    leaderboard = atomic_write_text(run_dir / "leaderboard.md", markdown)
    image = _plot(_rows(records))
    figure = (f'<figure><img src="data:image/png;base64,{image}" alt="perplexity vs keys attended">'
              "<figcaption>perplexity vs mean keys attended per query</figcaption></figure>") if image else ""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}")
    report = atomic_write_text(run_dir / "report.html",
                               "<!doctype html><html><head><meta charset='utf-8'><title>attnlab eval</title>"
                               f"<style>{style}</style></head><body>{figure}{_markdown_to_html(markdown)}"
                               "</body></html>")
    return report, leaderboard
