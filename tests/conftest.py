"""Shared pytest hooks: the fuzz marker and the fuzz counts in the terminal summary."""

from __future__ import annotations

import sys

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: property-based fuzzing (HYPOTHESIS_PROFILE=fuzz runs 20x the draws)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many op/layer calls the fuzz tests drew, and how many were refused with a ValueError/TypeError."""
    module = sys.modules.get("test_fuzz_ops")
    counts = getattr(module, "COUNTS", None)
    if not counts:
        return
    terminalreporter.write_sep("-", "fuzz draws")
    terminalreporter.write_line(
        f"ops: {counts['op draws']} draws, {counts['op results']} results checked against the reference, "
        f"{counts['op refusals']} refused (ValueError/TypeError naming the argument, or NotImplementedError "
        f"for an undefined masking regime)")
    terminalreporter.write_line(f"layers: {counts['layer draws']} draws, {counts['layer refusals']} refused")
