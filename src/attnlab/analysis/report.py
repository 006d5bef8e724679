"""Results files and the HTML report of ``attnlab analyze``.

Results are JSON lines (one object per metric and run, appended to ``results.jsonl``); the report
(``report.html``) holds one layer x head heatmap per ``[L, H]`` metric, the attention pattern of
chosen heads on a chosen input, and the tables, with the pictures embedded as PNG.

What the report shows is also stored, one section per metric, in ``report_sections.json``: a
rerun with fewer metrics replaces only the sections of the metrics it ran and keeps the others, and
:func:`rewrite_report` rebuilds ``report.html`` from that file alone (no model, no recomputation).
Every file except the append-only ``results.jsonl`` is written through a temporary file and a rename.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attnlab.files import atomic_write_text

__all__ = ["append_result", "read_results", "heatmap_png", "pattern_png", "write_report", "SECTIONS_FILE",
           "merge_sections", "read_sections", "rewrite_report", "write_sections", "write_sections_report"]

SECTIONS_FILE = "report_sections.json"
# the order of the sections in the report (metrics of ``attnlab analyze``; others follow, sorted)
SECTION_ORDER = ("retrieval", "sinks", "distance", "entropy", "importance")
# the heatmap title of a metric whose results record holds "values" (importance stores its own "measure")
HEATMAP_NAMES = {"distance": "mean attention distance (tokens)", "entropy": "normalised attention entropy",
                 "importance": "importance"}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def append_result(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` (tensors become lists, NaN becomes null) as one JSON line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream:
        stream.write(json.dumps(_plain(record)) + "\n")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """All JSON lines of a results file."""
    with Path(path).open() as stream:
        return [json.loads(line) for line in stream if line.strip()]


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _nan_for_null(values: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu()
    if isinstance(values, (list, tuple)):
        return [_nan_for_null(v) for v in values]
    return float("nan") if values is None else values


def heatmap_png(values: Sequence[Sequence[float]], title: str) -> str:
    """A layer x head heatmap as base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # stored results hold NaN as null (JSON has no NaN): back to NaN, then drawn as 0
    data = torch.as_tensor(_nan_for_null(values), dtype=torch.float64).nan_to_num(0.0)
    figure, axis = plt.subplots(figsize=(max(3.0, 0.45 * data.shape[1] + 1.5), max(2.5, 0.22 * data.shape[0] + 1)))
    image = axis.imshow(data.numpy(), aspect="auto", cmap="viridis", origin="upper")
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title(title)
    figure.colorbar(image, ax=axis)
    return _png(figure)


def pattern_png(probs: Sequence[Sequence[float]], tokens: Sequence[str], title: str) -> str:
    """One head's attention map (queries x keys) as base64 PNG, token labels when short enough."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = torch.as_tensor(_nan_for_null(probs), dtype=torch.float64)
    figure, axis = plt.subplots(figsize=(6, 5))
    axis.imshow(data.numpy(), cmap="magma", aspect="auto")
    if len(tokens) <= 48:
        axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        axis.set_yticks(range(len(tokens)), tokens, fontsize=6)
    axis.set_xlabel("key")
    axis.set_ylabel("query")
    axis.set_title(title)
    return _png(figure)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(path: str | Path, *, title: str, heatmaps: dict[str, Sequence[Sequence[float]]],
                 patterns: Sequence[tuple[str, Sequence[Sequence[float]], Sequence[str]]] = (),
                 tables: dict[str, Sequence[dict[str, Any]]] | None = None, notes: Sequence[str] = ()) -> Path:
    """Write ``report.html``: heatmaps (``{metric: [L][H]}``), head patterns
    (``(caption, probs [N][M], tokens)``), tables (``{caption: rows}``) and free-text notes."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    if heatmaps:
        parts.append("<h2>Layer x head heatmaps</h2>")
        for name, values in heatmaps.items():
            image = heatmap_png(values, name)
            parts.append(f'<figure><img src="data:image/png;base64,{image}" alt="{html.escape(name)}">'
                         f"<figcaption>{html.escape(name)}</figcaption></figure>")
    if patterns:
        parts.append("<h2>Attention patterns of chosen heads</h2>")
        for caption, probs, tokens in patterns:
            parts.append(f'<figure><img src="data:image/png;base64,{pattern_png(probs, tokens, caption)}" '
                         f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    for caption, rows in (tables or {}).items():
        parts.append(f"<h2>{html.escape(caption)}</h2>{_table(rows)}")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}figure{display:inline-block}")
    document = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return atomic_write_text(path, document)


def read_sections(run_dir: str | Path) -> dict[str, Any]:
    """The stored report sections of an analysis folder (``{"title", "sections": {metric: section}}``),
    or an empty document when the folder has none yet."""
    path = Path(run_dir) / SECTIONS_FILE
    if not path.exists():
        return {"title": None, "sections": {}}
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("sections"), dict):
        raise ValueError(f"{path} is not an attnlab analysis sections file (no 'sections' object); "
                         "remove it or choose another --out folder")
    return document


def merge_sections(stored: dict[str, Any], new: dict[str, dict[str, Any]], *, title: str) -> dict[str, Any]:
    """``stored`` with the sections in ``new`` replacing those of the same metric; the others are kept.

    A section is ``{"heatmaps": {name: [L][H]}, "tables": {caption: rows},
    "patterns": [[caption, probs [N][N], tokens]], "notes": [text]}``.
    """
    sections = dict(stored.get("sections", {}))
    sections.update(_plain(new))
    return {"title": title, "sections": sections}


def write_sections(run_dir: str | Path, document: dict[str, Any]) -> Path:
    """Store ``document`` (see :func:`merge_sections`) as the folder's ``report_sections.json``."""
    return atomic_write_text(Path(run_dir) / SECTIONS_FILE, json.dumps(_plain(document)))


def _sections_from_results(run_dir: Path) -> dict[str, Any]:
    """Sections rebuilt from ``results.jsonl`` alone (folders written before the sections file existed):
    the last record of each metric gives its heatmaps; tables and patterns were not stored there."""
    sections: dict[str, dict[str, Any]] = {}
    for record in read_results(run_dir / "results.jsonl"):
        metric, heatmaps = record.get("metric"), {}
        if metric in HEATMAP_NAMES and "values" in record:
            heatmaps[record.get("measure", HEATMAP_NAMES[metric])] = record["values"]
        elif metric == "sinks":
            heatmaps = {"share of attention on sink tokens": record.get("share"),
                        "share of attention on the first token": record.get("share_first_token")}
        elif metric == "retrieval":
            heatmaps["retrieval score"] = record.get("scores")
        heatmaps = {name: values for name, values in heatmaps.items() if values is not None}
        if metric and heatmaps:
            sections[metric] = {"heatmaps": heatmaps, "tables": {}, "patterns": [],
                                "notes": [f"{metric}: {record.get('model')} at {record.get('time')} "
                                          "(rebuilt from results.jsonl: tables and patterns not stored)"]}
    return {"title": None, "sections": sections}


def rewrite_report(run_dir: Path) -> Path:
    """Rebuild ``run_dir/report.html`` of an ``attnlab analyze`` folder from its stored results.

    Reads ``report_sections.json`` (every section the report showed), or, for a folder that has
    only ``results.jsonl``, the heatmaps stored there. Nothing is recomputed and no model is loaded.

    Raises:
        FileNotFoundError: the folder has neither file (not an analysis folder).
    """
    run_dir = Path(run_dir)
    if (run_dir / SECTIONS_FILE).exists():
        document = read_sections(run_dir)
    elif (run_dir / "results.jsonl").exists():
        document = _sections_from_results(run_dir)
    else:
        raise FileNotFoundError(f"{run_dir} has neither {SECTIONS_FILE} nor results.jsonl: "
                                "not an `attnlab analyze` folder (run `attnlab analyze --out` first)")
    return write_sections_report(run_dir, document)


def write_sections_report(run_dir: str | Path, document: dict[str, Any]) -> Path:
    """Write ``report.html`` from a sections document: each metric's notes, heatmaps, patterns and tables,
    metrics in the analysis order."""
    sections = document.get("sections", {})
    order = [m for m in SECTION_ORDER if m in sections] + sorted(m for m in sections if m not in SECTION_ORDER)
    heatmaps: dict[str, Any] = {}
    patterns: list[Any] = []
    tables: dict[str, Any] = {}
    notes: list[str] = list(document.get("notes", []))
    for metric in order:
        section = sections[metric]
        notes += list(section.get("notes", []))
        heatmaps.update(section.get("heatmaps", {}))
        patterns += [tuple(p) for p in section.get("patterns", [])]
        tables.update(section.get("tables", {}))
    title = document.get("title") or f"attnlab analyze: {Path(run_dir).name}"
    return write_report(Path(run_dir) / "report.html", title=title, heatmaps=heatmaps, patterns=patterns,
                        tables=tables, notes=notes)
