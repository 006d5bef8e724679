"""Command ``attnlab report``: re-writes the report of a run folder from its stored results.

Only the parser is built at import time; the report code (matplotlib) is imported when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attnlab.console import make_console

__all__ = ["add_commands", "cmd_report"]


def cmd_report(args: argparse.Namespace) -> int:
    """Write ``report.html`` and ``leaderboard.md`` of a run folder."""
    from attnlab.bench.report import write_report

    console = make_console()
    try:
        report, leaderboard = write_report(args.run_dir)
    except FileNotFoundError as error:
        console.print(f"[red]{error}[/red]")
        return 2
    console.print(f"wrote {report} and {leaderboard}")
    return 0


def add_commands(sub: Any, bench: Any) -> None:
    """Register ``attnlab report`` (under ``sub``)."""
    p = sub.add_parser("report", help="report.html and leaderboard.md of a run folder")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_report)
