"""Bad invocations of the ``attnlab`` command: exit code 2, exactly one line on stderr, no traceback.

Table-driven and in-process (``main([...])`` with capsys) for speed; a few run the real entry point
in a subprocess. Every row is refused before any work starts: the tests also check that no output
folder was created. How other failures end (an unexpected exception, Ctrl-C, ``--debug``) is
checked at the bottom.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.cli import main
from attnlab.cli_errors import UsageError
from attnlab.registry import _REGISTRY
from attnlab.registry import get as get_mechanism


def invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``attnlab ARGV`` run in this process (argparse exits via SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# (argv with OUT for a folder that must not appear, what the one stderr line must contain)
BAD = [
    # global flags and the parser
    (["--debug"], "the following arguments are required: command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["--frobnicate", "list"], "unrecognized arguments: --frobnicate"),
    (["list", "extra"], "unrecognized arguments: extra"),
    # list / check
    (["check", "bogus"], "attnlab check: error: NAME unknown mechanism 'bogus'"),
    (["check", "sofmax"], "did you mean 'softmax'"),
    (["check", "moh"], "NAME: nothing to check: moh is a layer"),
    (["check", "moh", "shrp"], "shrp is a layer"),
    (["check", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    # bench speed: each refused before anything is timed
    (["bench", "speed", "--preset", "smoke", "--impls", "bogus", "--mechanisms", "softmax", "--out", "OUT"],
     "--impls: 'bogus' is no impl of the chosen mechanisms"),
    (["bench", "speed", "--preset", "smoke", "--impls", "sdpa", "--mechanisms", "moh", "--out", "OUT"],
     "--impls: 'sdpa' is no impl"),
    (["bench", "speed", "--preset", "smoke", "--mechanisms", "efficient_probe", "--out", "OUT"], "0 cells to time"),
    (["bench", "speed", "--preset", "smoke", "--batch", "0", "--out", "OUT"], "--batch=0: must be a positive"),
    (["bench", "speed", "--preset", "smoke", "--threads", "0", "--out", "OUT"], "--threads=0: must be a positive"),
    (["bench", "speed", "--preset", "smoke", "--heads", "-1", "--out", "OUT"], "--heads=-1"),
    (["bench", "speed", "--preset", "smoke", "--max-cell-seconds", "0", "--out", "OUT"], "--max-cell-seconds=0.0"),
    (["bench", "speed", "--preset", "smoke", "--mechanisms", "sofmax", "--out", "OUT"],
     "--mechanisms: unknown mechanism 'sofmax'; did you mean 'softmax'"),
    (["bench", "speed", "--preset", "smoke", "--mechanisms", "", "--out", "OUT"], "--mechanisms is empty"),
    (["bench", "speed", "--preset", "smoke", "--mode", "fwd,bwd", "--out", "OUT"], "--mode: "),
    (["bench", "speed", "--preset", "smoke", "--dtype", "float8", "--out", "OUT"], "--dtype: "),
    (["bench", "speed", "--preset", "nope", "--out", "OUT"], "--preset: "),
    (["bench", "speed", "--preset", "smoke", "--device", "tpu", "--out", "OUT"], "--device 'tpu'"),
    (["bench", "speed", "--preset", "smoke", "--lengths", "1,x", "--out", "OUT"], "argument --lengths"),
    # analyze: refused before the model's weights load (see also tests/test_analysis_cli.py)
    (["analyze", "--model", "/nonexistent/model", "--out", "OUT"], "--model: model '/nonexistent/model'"),
    (["analyze", "--model", "/nonexistent/model", "--probe-tokens", "0", "--out", "OUT"], "--probe-tokens=0"),
    (["analyze", "--model", "/nonexistent/model", "--heads", "1:2", "--out", "OUT"], "is not LAYER-HEAD"),
    (["analyze", "--model", "/nonexistent/model", "--metrics", "sinks,bogus", "--out", "OUT"],
     "unknown metric(s) bogus"),
    (["analyze", "--out", "OUT"], "the following arguments are required: --model"),
    # eval
    (["eval", "--mechanisms", "bogus", "--out", "OUT"], "--mechanisms: unknown mechanism 'bogus'"),
    (["eval", "--mechanisms", "hip:k_budget", "--out", "OUT"], "is not key=value; write it as hip:k_budget=VALUE"),
    (["eval", "--mechanisms", "", "--out", "OUT"], "names no mechanism"),
    (["eval", "--context", "0", "--out", "OUT"], "--context '0': every context must be >= 2"),
    (["eval", "--context", "", "--out", "OUT"], "--context is empty"),
    (["eval", "--windows", "0", "--out", "OUT"], "--windows=0"),
    (["eval", "--needle-depths", "1.5", "--out", "OUT"], "--needle-depths '1.5'"),
    (["eval", "--text", "/nonexistent.txt", "--out", "OUT"], "--text '/nonexistent.txt': no such file"),
    (["eval", "--model", "/nonexistent/model", "--out", "OUT"], "--model: model '/nonexistent/model'"),
    # report
    (["report", "OUT"], "attnlab report: error: "),
]


def _id(row: tuple[list[str], str]) -> str:
    argv = [a for a in row[0] if a not in ("--out", "OUT", "--preset", "smoke")]
    return " ".join(argv) or "(none)"


@pytest.mark.parametrize("argv,expected", BAD, ids=[_id(row) for row in BAD])
def test_a_bad_invocation_is_one_line_on_stderr_and_exit_2(argv: list[str], expected: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = invoke([str(out) if a == "OUT" else a for a in argv], capsys)
    assert code == 2, (stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert expected in lines[0], lines[0]
    assert lines[0].startswith("attnlab") and "Traceback" not in stderr + stdout
    assert not out.exists()  # refused before anything was written


def test_an_out_path_that_is_a_file_is_refused_by_every_command(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a_file"
    target.write_text("keep me")
    for argv in (["bench", "speed", "--preset", "smoke", "--mechanisms", "softmax"], ["eval"],
                 ["analyze", "--model", "/nonexistent/model"]):
        code, _, stderr = invoke([*argv, "--out", str(target)], capsys)
        assert code == 2 and len(stderr.splitlines()) == 1 and "--out" in stderr, stderr
    assert target.read_text() == "keep me"


def _break_softmax(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    softmax = get_mechanism("softmax")

    def broken(q, k, v, **options):
        raise error

    monkeypatch.setitem(_REGISTRY, "softmax", dataclasses.replace(softmax, op=broken))


def test_an_unexpected_exception_is_one_line_naming_it_and_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _break_softmax(monkeypatch, RuntimeError("the kernel broke\nsecond line"))
    code, _, stderr = invoke(["check", "softmax"], capsys)
    assert code == 1
    assert stderr == ("attnlab check: RuntimeError: the kernel broke; second line "
                      "(rerun with --debug for the traceback)\n")


def test_debug_anywhere_shows_the_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="unknown mechanism 'bogus'"):
        main(["--debug", "check", "bogus"])
    with pytest.raises(UsageError, match="--batch=0"):
        main(["bench", "speed", "--batch", "0", "--debug"])
    _break_softmax(monkeypatch, RuntimeError("the kernel broke"))
    with pytest.raises(RuntimeError, match="the kernel broke"):
        main(["check", "softmax", "--debug"])


def test_ctrl_c_is_interrupted_and_exit_130(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _break_softmax(monkeypatch, KeyboardInterrupt())
    code, _, stderr = invoke(["check", "softmax"], capsys)
    assert (code, stderr) == (130, "attnlab check: interrupted\n")


def test_a_speed_run_whose_cells_all_fail_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _break_softmax(monkeypatch, RuntimeError("no kernel today"))
    code, stdout, stderr = invoke(["bench", "speed", "--preset", "smoke", "--mechanisms", "softmax", "--memory", "none",
                                   "--lengths", "16", "--out", str(tmp_path / "run")], capsys)
    assert code == 1, (stdout, stderr)
    assert "every cell failed" in stderr and "no kernel today" in stderr and len(stderr.splitlines()) == 1


def test_check_of_a_layer_with_a_reference_impl_runs_it(capsys: pytest.CaptureFixture[str]) -> None:
    """``tensor`` is a layer only, with impl='reference': checked (both modes), not refused."""
    code, stdout, stderr = invoke(["check", "tensor"], capsys)
    assert code == 0 and stderr == ""
    assert stdout.count(" ok ") + stdout.count("│ ok") >= 2 and "tensor" in stdout


def test_check_of_a_layer_with_a_broken_fast_path_disagrees(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import attnlab.nn.tensor as tensor_module

    original = tensor_module.TensorAttention.forward

    def skewed(self, x):
        out = original(self, x)
        return out if self.impl == "reference" else out * 1.01

    monkeypatch.setattr(tensor_module.TensorAttention, "forward", skewed)
    code, stdout, _ = invoke(["check", "tensor"], capsys)
    assert code == 1 and "DISAGREES" in stdout


SUBPROCESS = [
    (["check", "bogus"], "attnlab check: error: NAME unknown mechanism 'bogus'"),
    (["bench", "speed", "--batch", "0", "--out", "OUT"], "attnlab bench speed: error: --batch=0"),
]


@pytest.mark.parametrize("argv,expected", SUBPROCESS, ids=[" ".join(row[0][:2]) for row in SUBPROCESS])
def test_the_real_entry_point_prints_one_line(argv: list[str], expected: str, tmp_path: Path) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    result = subprocess.run([sys.executable, "-m", "attnlab.cli", *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(expected)
    assert not (tmp_path / "out").exists()


def test_the_real_entry_point_with_debug_shows_the_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "attnlab.cli", "--debug", "bench", "speed", "--batch", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr and "UsageError: --batch=0" in result.stderr


def test_ctrl_c_in_bench_speed_and_eval_says_how_to_resume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import attnlab.bench.speed as speed
    import attnlab.hf.eval as evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(speed, "run_speed_benchmark", interrupted)
    code, _, stderr = invoke(["bench", "speed", "--preset", "smoke", "--mechanisms", "softmax", "--out",
                              str(tmp_path / "speed")], capsys)
    assert code == 130 and stderr.startswith("interrupted; the cells timed so far are in ")
    assert "rerun the same command to resume" in stderr and len(stderr.splitlines()) == 1

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.jsonl").write_text('{"kind": "row"}\n{"kind": "row"}\n')
    monkeypatch.setattr(evaluation, "run_eval", interrupted)
    code, _, stderr = invoke(["eval", "--model", str(model), "--out", str(tmp_path / "eval")], capsys)
    assert code == 130 and stderr.startswith("interrupted; 2 rows saved in ") and len(stderr.splitlines()) == 1


def test_device_cuda_without_cuda_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build, whatever this machine has
    for argv, expected in ((["--device", "cuda"], "--device cuda: this torch"),
                           (["--device", "cuda:1"], "--device cuda:1: this torch"),
                           (["--preset", "gpu"], "--device: device='cuda' but no CUDA device")):
        code, _, stderr = invoke(["bench", "speed", *argv, "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and len(stderr.splitlines()) == 1 and expected in stderr, stderr
    assert not (tmp_path / "out").exists()
