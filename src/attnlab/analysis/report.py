"""Results files and the HTML report of ``attnlab analyze``.

Results are JSON lines (one object per metric and run, appended to ``results.jsonl``); the report
(``report.html``) holds one layer x head heatmap per ``[L, H]`` metric, the attention pattern of
chosen heads on a chosen input, and the tables, with the pictures embedded as PNG.
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

__all__ = ["append_result", "read_results", "heatmap_png", "pattern_png", "write_report"]


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


def heatmap_png(values: Sequence[Sequence[float]], title: str) -> str:
    """A layer x head heatmap as base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = torch.as_tensor(values).double().nan_to_num(0.0)
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

    data = torch.as_tensor(probs).double()
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document)
    return path
