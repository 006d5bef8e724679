"""The command line: list, check, and the failure exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attnlab.cli import main
from attnlab.registry import _REGISTRY
from attnlab.registry import get as get_mechanism


def test_list_prints_every_mechanism(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "softmax" in out and "Attention Is All You Need" in out and "1706.03762" in out


def test_check_passes_and_unknown_name_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "softmax"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["check", "sofmax"]) == 2


def test_check_exits_non_zero_when_a_fast_path_disagrees(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    softmax = get_mechanism("softmax")

    def broken(q, k, v, **options):
        return softmax.op(q, k, v, **options) * 1.01

    monkeypatch.setitem(_REGISTRY, "softmax", dataclasses.replace(softmax, op=broken))
    assert main(["check", "softmax"]) == 1
    assert "DISAGREES" in capsys.readouterr().out


def test_console_script_help() -> None:
    result = subprocess.run([sys.executable, "-m", "attnlab.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "list" in result.stdout and "check" in result.stdout


def test_an_unknown_preset_exits_2_naming_the_presets(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--preset", "quik", "--out", str(tmp_path / "demo")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the list
    assert captured.err.startswith("attnlab demo: error: --preset: unknown preset 'quik'") and "quick" in captured.err
    assert not (tmp_path / "demo").exists()
    assert main(["bench", "quality", "--preset", "quik", "--out", str(tmp_path / "q")]) == 2
    captured = capsys.readouterr()
    assert "'quik'" in captured.err and "quick" in captured.err and len(captured.err.splitlines()) == 1
    with pytest.raises(SystemExit):  # the demo's unused --seed is gone
        main(["demo", "--seed", "1"])


def test_the_demo_prefers_registered_mechanisms_only() -> None:
    from attnlab.bench.demo import PREFERRED_MECHANISMS
    from attnlab.registry import mechanisms

    registered = {m.name for m in mechanisms()}
    assert [n for n in PREFERRED_MECHANISMS if n not in registered] == []
    assert PREFERRED_MECHANISMS[0] == "softmax" and len(set(PREFERRED_MECHANISMS)) == len(PREFERRED_MECHANISMS)
