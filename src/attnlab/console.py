"""The terminal console the ``attnlab`` commands print to, made per command (no shared global)."""

from __future__ import annotations

import sys

from rich.console import Console

__all__ = ["make_console"]


def make_console() -> Console:
    """A ``rich`` console on stdout; 150 columns when stdout is not a terminal (logs, pipes, tests),
    where rich would otherwise wrap the tables at 80."""
    return Console(width=None if sys.stdout.isatty() else 150)
