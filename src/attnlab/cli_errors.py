"""How the ``attnlab`` commands fail: one line naming the argument and the fix, exit 2, no traceback.

A command raises :class:`UsageError` for a request it refuses (a bad value, a run that would do
nothing, a folder that holds something else) and :class:`Interrupted` when Ctrl-C stopped it after
saving what was done. ``attnlab.cli.main`` turns both into their message and exit code; ``--debug``
shows the traceback instead. Nothing here imports torch, so the parsers stay fast to build.
"""

from __future__ import annotations

__all__ = ["UsageError", "Interrupted", "USAGE_EXIT", "INTERRUPT_EXIT"]

USAGE_EXIT = 2  # argparse's own code for a bad command line
INTERRUPT_EXIT = 130  # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C


class UsageError(ValueError):
    """A request a command refuses: ``str(error)`` is the one line shown (argument, why, the fix)."""


class Interrupted(Exception):
    """Ctrl-C stopped a command after it saved its work: ``str(error)`` says what was saved and how to
    resume (e.g. "interrupted; 3 of 6 runs saved in runs/x; rerun the same command to resume")."""
