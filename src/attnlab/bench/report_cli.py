"""Command ``attnlab report DIR``: re-writes the report of a run folder from its stored results.

Four kinds of folder have a report, each recognised from its own files (:func:`folder_kinds`):

- ``quality``: ``results.jsonl`` holding quality-benchmark records (``task``, ``mechanism``);
- ``speed``: ``speed.jsonl`` (``attnlab bench speed``); a folder with both gets one report with both;
- ``analysis``: ``report_sections.json``, or ``results.jsonl`` holding ``attnlab analyze`` records
  (``model`` and a head-level ``metric``); rebuilt by :func:`attnlab.analysis.report.rewrite_report`;
- ``eval``: ``results.jsonl`` holding ``attnlab eval`` rows (``kind``: ``row`` / ``prefill_timing``).

A folder of no known kind, or one mixing analysis or eval results with another kind, is refused with a
:class:`~attnlab.cli_errors.UsageError` and nothing is written: a report is never replaced by one of
another kind (or by an empty page). Only the parser is built at import time; the report code
(matplotlib) is imported when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attnlab.cli_errors import UsageError
from attnlab.console import make_console

__all__ = ["add_commands", "cmd_report", "folder_kinds", "ANALYSIS_METRICS", "EVAL_KINDS"]

ANALYSIS_METRICS = frozenset({"retrieval", "sinks", "distance", "entropy", "importance"})
EVAL_KINDS = frozenset({"row", "prefill_timing"})


def _record_kind(record: dict[str, Any]) -> str | None:
    if "task" in record and "mechanism" in record:
        return "quality"
    if record.get("kind") in EVAL_KINDS and "model" in record:
        return "eval"
    if record.get("metric") in ANALYSIS_METRICS and "model" in record:
        return "analysis"
    return None


def folder_kinds(run_dir: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """The kinds of results ``run_dir`` holds, and the unreadable lines of its ``results.jsonl``."""
    from attnlab.bench.results import read_results

    kinds: set[str] = set()
    if (run_dir / "speed.jsonl").exists():
        kinds.add("speed")
    if (run_dir / "report_sections.json").exists():
        kinds.add("analysis")
    stored = read_results(run_dir / "results.jsonl")
    kinds |= {kind for kind in map(_record_kind, stored.records) if kind}
    return kinds, stored.problems


def _render(run_dir: Path, kinds: set[str]) -> list[Path]:
    if kinds <= {"quality", "speed"}:
        from attnlab.bench.report import write_report

        return list(write_report(run_dir))
    if kinds == {"analysis"}:
        from attnlab.analysis.report import rewrite_report

        return [rewrite_report(run_dir)]
    from attnlab.bench.results import read_results
    from attnlab.hf.eval_report import write_eval_report

    return list(write_eval_report(run_dir, read_results(run_dir / "results.jsonl").records))


def cmd_report(args: argparse.Namespace) -> int:
    """Re-write the report of a run folder of any kind (see the module doc); refuse one it cannot rebuild."""
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        what = "a file" if run_dir.exists() else "not found"
        raise UsageError(f"run_dir {run_dir} is {what}: give the folder a benchmark, `attnlab analyze` or "
                         "`attnlab eval` wrote (its --out)")
    kinds, problems = folder_kinds(run_dir)
    if not kinds:
        found = ", ".join(sorted(p.name for p in run_dir.iterdir())[:8]) or "nothing"
        raise UsageError(f"run_dir {run_dir} holds no results this command can rebuild a report from (results.jsonl "
                         f"of a benchmark, analyze or eval run, or speed.jsonl; found: {found}); nothing was "
                         "written: give the --out folder of such a run")
    if len(kinds) > 1 and not kinds <= {"quality", "speed"}:
        raise UsageError(f"run_dir {run_dir} mixes results of kinds {', '.join(sorted(kinds))}: one report cannot "
                         "show them together and none was overwritten; move each run's files to its own folder")
    console = make_console()
    for number, reason in problems:
        console.print(f"[yellow]results.jsonl line {number}: {reason}; left out[/yellow]")
    paths = _render(run_dir, kinds)
    console.print(f"wrote {' and '.join(str(p) for p in paths)} ({' + '.join(sorted(kinds))} run)")
    return 0


def add_commands(sub: Any, bench: Any) -> None:
    """Register ``attnlab report`` (under ``sub``)."""
    p = sub.add_parser("report", help="re-write report.html (and leaderboard.md) of a run folder from its results: "
                                      "a quality or speed benchmark, an analyze or an eval run")
    p.add_argument("run_dir", type=Path, help="the run's --out folder")
    p.set_defaults(func=cmd_report)
