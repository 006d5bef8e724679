"""The small Markdown subset the reports write, as HTML (no Markdown library needed).

Both reports (:mod:`attnlab.bench.report`, :mod:`attnlab.bench.speed_report`) write Markdown first
and embed the same text in their HTML pages through :func:`markdown_to_html`.
"""

from __future__ import annotations

import html

__all__ = ["markdown_to_html"]


def _is_separator(line: str) -> bool:
    return set(line.replace("|", "").strip()) <= set("-: ")


def markdown_to_html(markdown: str, *, table_class: str | None = None) -> str:
    """Pipe tables, ``## `` headings, whole-line ``**bold**`` (a small heading), ``- `` notes and
    paragraphs, as HTML. A ``# `` title line is dropped: the page around it has its own title."""
    out: list[str] = []
    table: list[list[str]] = []
    opening = f'<table class="{table_class}">' if table_class else "<table>"

    def flush() -> None:
        if table:
            head, *body = table
            out.append(opening + "<tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            if not _is_separator(line):
                table.append([html.escape(c.strip()) for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            continue
        elif line.startswith("**") and line.endswith("**") and len(line) > 4:
            out.append(f"<h4>{html.escape(line.strip('*'))}</h4>")
        elif line.startswith("- "):
            out.append(f'<div class="note">{html.escape(line[2:])}</div>')
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)
