"""Results files: one JSON object per line, appended as each run finishes, read back to resume.

Generic on purpose (the quality and the speed benchmark both use it): a record is any JSON-serialisable
``dict``; a *key* is the tuple of the values of some of its fields, and a run whose key is already in
the file is skipped. An interrupted write leaves at most one truncated last line, which
:func:`load_results` ignores (and the next append starts on a fresh line).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["append_result", "load_results", "result_key", "completed_keys", "versions"]


def _canonical(value: Any) -> Any:
    """A hashable, order-independent form of a JSON value (for keys)."""
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, list | tuple):
        return json.dumps(list(value), sort_keys=True, default=str)
    return value


def result_key(record: Mapping[str, Any], fields: Sequence[str]) -> tuple[Any, ...]:
    """The values of ``fields`` in ``record`` (missing fields count as ``None``)."""
    return tuple(_canonical(record.get(f)) for f in fields)


def append_result(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created with its folder), flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, allow_nan=True)
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a previous write was interrupted mid-line
                prefix = "\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(prefix + line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of ``path`` (``[]`` when it does not exist); unparsable lines are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def completed_keys(records: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> set[tuple[Any, ...]]:
    """The keys of ``records`` over ``fields``."""
    return {result_key(r, fields) for r in records}


def versions() -> dict[str, str]:
    """Versions worth recording next to a measurement."""
    import attnlab

    return {"attnlab": attnlab.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}
