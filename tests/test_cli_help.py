"""``attnlab --help`` stays fast and complete: building the parser imports no torch (checked in a fresh
interpreter, not timed), and every option of every command shows its default."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from attnlab.cli import build_parser

LIGHT = """
import json, sys
import attnlab.cli
parser = attnlab.cli.build_parser()
helps = [parser.format_help()]
stack = [parser]
while stack:  # every subcommand's help too
    for action in stack.pop()._actions:
        if isinstance(action, __import__("argparse")._SubParsersAction):
            for sub in action.choices.values():
                helps.append(sub.format_help())
                stack.append(sub)
heavy = sorted(m for m in ("torch", "transformers", "attnlab.ops", "attnlab.nn", "matplotlib") if m in sys.modules)
print(json.dumps({"heavy": heavy, "helps": len(helps)}))
"""


def test_building_the_parser_and_every_help_imports_no_torch() -> None:
    result = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["heavy"] == [] and report["helps"] >= 9  # attnlab, list, check, demo, bench, 2 bench, report, ...


def test_attnlab_help_runs_without_torch() -> None:
    code = ("import runpy, sys\nsys.argv = ['attnlab', '--help']\ntry:\n    runpy.run_module('attnlab.cli', "
            "run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("list", "check", "demo", "bench", "report", "analyze", "eval", "--debug"):
        assert command in result.stdout


def _parsers(parser: argparse.ArgumentParser, name: str = "attnlab") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(name, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _parsers(sub, f"{name} {sub_name}")
    return found


def test_every_option_of_every_command_shows_its_default() -> None:
    missing = []
    for name, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        assert isinstance(formatter, argparse.ArgumentDefaultsHelpFormatter), name
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue  # positionals, --help, --version
            if action.help is None or "%(default)" not in formatter._get_help_string(action):
                missing.append(f"{name} {action.option_strings[0]}")
            elif str(action.default) not in parser.format_help().replace("\n", " ").replace("  ", " "):
                missing.append(f"{name} {action.option_strings[0]} (default {action.default!r} not printed)")
    assert missing == []


def test_the_speed_help_says_how_many_threads_it_uses() -> None:
    speed = dict(_parsers(build_parser()))["attnlab bench speed"]
    text = " ".join(speed.format_help().split())
    assert "all cores" in text and "one thread per worker process" in text
