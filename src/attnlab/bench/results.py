"""Results files: one JSON object per line, appended as each run finishes, read back to resume.

Generic on purpose (the quality and the speed benchmark both use it): a record is any JSON-serialisable
``dict``; a *key* is the tuple of the values of some of its fields, and a run whose key is already in
the file is skipped. An interrupted write leaves at most one truncated last line, which
:func:`read_results` reports with its line number (and the next append starts on a fresh line).
Reading keeps every record; :func:`deduplicate` then keeps one per key (an ok run over a failed one,
then the latest), since a file may hold a run twice (a failed try and its rerun).

One writer per folder: :func:`exclusive_writer` holds an OS file lock on ``<out>/.attnlab.lock`` for
as long as a run appends to the folder, so two runs started on the same ``--out`` cannot both train
the same pending runs and append duplicate records; the second one is refused with the holder's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from attnlab.cli_errors import UsageError

__all__ = ["append_result", "load_results", "read_results", "ResultsRead", "deduplicate", "is_ok", "result_key",
           "completed_keys", "versions", "exclusive_writer", "LOCK_FILE", "QUALITY_RECORD_KEY"]

# What makes two quality records the same run: the job's own key (the config holds the variant and its
# options) plus the learning rate, which the sweep varies within one config.
QUALITY_RECORD_KEY = ("task", "config", "mechanism", "lr", "seed")

LOCK_FILE = ".attnlab.lock"

# Folders this process already holds, with how many nested holders: a run that locked its folder may call
# code that locks it again (the demo around the quality runner); flock on a second descriptor of the same
# file would refuse the process itself.
_held: dict[Path, list[int]] = {}
_held_guard = threading.Lock()


def _describe_holder(text: str) -> str:
    """'pid 123, started 2026-12-03 06:01:02 UTC' from the lock file's contents (best effort)."""
    try:
        info = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["started"])))
        return f"pid {int(info['pid'])}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown (it is starting up)"


@contextlib.contextmanager
def exclusive_writer(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``out_dir`` for writing: an exclusive, non-blocking ``fcntl.flock`` on ``out_dir/.attnlab.lock``.

    The lock file records the holder's pid and start time (JSON). A second process asking for the same
    folder gets :class:`attnlab.cli_errors.UsageError` naming the folder, the holder and the fix, at once
    (it does not wait). The OS drops the lock when the holder exits, however it exits, so a killed run
    leaves no stale lock behind. Re-entrant within one process. Yields the folder (created if missing).
    """
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file, not a folder: choose a folder for the run's results")
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield folder
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return

    lock_path = folder / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = _describe_holder(lock_path.read_text(encoding="utf-8"))
        finally:
            os.close(fd)
        raise UsageError(f"--out {folder} is being written by another attnlab run ({holder}): wait for it to "
                         "finish or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode("utf-8"))
        os.fsync(fd)
        with _held_guard:
            _held[key] = [fd, 1]
        try:
            yield folder
        finally:
            with _held_guard:
                del _held[key]
            os.ftruncate(fd, 0)  # no stale pid for the next reader; the file itself stays (unlinking races)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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


class ResultsRead(NamedTuple):
    """What :func:`read_results` found: the records, and each line it could not use as (line number, why)."""

    records: list[dict[str, Any]]
    problems: list[tuple[int, str]]


def read_results(path: str | os.PathLike[str]) -> ResultsRead:
    """Every record of ``path`` (empty when it does not exist) and every unreadable line with its number.

    A line is unreadable when it is not UTF-8, not JSON (a truncated write leaves such a last line) or a
    JSON value other than an object. Blank lines are not records and not problems. Nothing is dropped
    without being listed: callers print ``problems`` (``attnlab report`` does, one line each).
    """
    path = Path(path)
    if not path.exists():
        return ResultsRead([], [])
    records: list[dict[str, Any]] = []
    problems: list[tuple[int, str]] = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append((number, f"not UTF-8 text ({error.reason} at byte {error.start})"))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append((number, f"not a complete JSON object ({error.msg} at column {error.colno}; "
                                     "a write that was interrupted?)"))
            continue
        if not isinstance(record, dict):
            problems.append((number, f"a JSON {type(record).__name__}, not an object"))
            continue
        records.append(record)
    return ResultsRead(records, problems)


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of ``path`` (``[]`` when it does not exist), in file order, duplicates included;
    unreadable lines are left out (:func:`read_results` lists them)."""
    return read_results(path).records


def is_ok(record: Mapping[str, Any]) -> bool:
    """Whether a record is a finished run (``"status": "ok"``, or no status: records older than the field)."""
    return record.get("status", "ok") == "ok"


def deduplicate(records: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> list[dict[str, Any]]:
    """One record per key over ``fields``: an ok run wins over a failed one, and among equals the latest
    ``finished`` time (then the later line). The winners keep the file order of their keys' first lines."""
    records = list(records)
    best: dict[tuple[Any, ...], tuple[tuple[bool, str, int], int]] = {}  # key -> (preference, index)
    for index, record in enumerate(records):
        key = result_key(record, fields)
        preference = (is_ok(record), str(record.get("finished", "")), index)
        if key not in best or preference > best[key][0]:
            best[key] = (preference, index)
    # dicts keep insertion order, so ``best`` lists the keys in the order of their first lines
    return [dict(records[index]) for _, index in best.values()]


def completed_keys(records: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> set[tuple[Any, ...]]:
    """The keys of ``records`` over ``fields``."""
    return {result_key(r, fields) for r in records}


def versions() -> dict[str, str]:
    """Versions worth recording next to a measurement."""
    import attnlab

    return {"attnlab": attnlab.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}
