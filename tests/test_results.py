"""The results store: one writer per folder (two processes), de-duplication, unreadable lines reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from attnlab.bench.results import (
    LOCK_FILE,
    QUALITY_RECORD_KEY,
    append_result,
    deduplicate,
    exclusive_writer,
    is_ok,
    load_results,
    read_results,
)
from attnlab.cli_errors import UsageError

# A writer process: takes the folder, signals that it holds it, appends the runs not yet in the file (the
# first two, then waits for the test's "release" file as a slow benchmark would, then the rest), then exits.
# It prints "refused: <message>" if another process holds the folder.
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from attnlab.bench.results import append_result, exclusive_writer, load_results
    from attnlab.cli_errors import UsageError
    out, name = Path(sys.argv[1]), sys.argv[2]
    try:
        with exclusive_writer(out):
            (out / f"{name}.holding").write_text("1")
            done = {r["seed"] for r in load_results(out / "results.jsonl")}
            for seed in range(4):
                if seed == 2:
                    while not (out / "release").exists():
                        time.sleep(0.02)
                if seed not in done:
                    append_result(out / "results.jsonl", {"seed": seed, "writer": name})
    except UsageError as error:
        print("refused:", error)
        sys.exit(2)
    print("wrote")
""")


def _start(out: Path, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_writer_process_is_refused_with_the_holder_pid_and_no_duplicates(tmp_path: Path) -> None:
    first = _start(tmp_path, "first")
    _wait_for(tmp_path / "first.holding", first)
    second = _start(tmp_path, "second")
    out2, err2 = second.communicate(timeout=60)  # the first still holds the folder (it waits for "release")
    (tmp_path / "release").write_text("1")
    out1, err1 = first.communicate(timeout=60)
    assert first.returncode == 0, err1
    assert second.returncode == 2, err2
    assert f"refused: --out {tmp_path} is being written by another attnlab run (pid {first.pid}," in out2
    assert "wait for it to finish or choose another --out" in out2
    records = load_results(tmp_path / "results.jsonl")
    assert sorted(r["seed"] for r in records) == [0, 1, 2, 3]
    assert {r["writer"] for r in records} == {"first"}
    # Once the holder has exited the folder is free again, and a resumed run finds nothing left to do.
    third = _start(tmp_path, "third")
    out3, err3 = third.communicate(timeout=60)
    assert third.returncode == 0 and "wrote" in out3, err3
    assert len(load_results(tmp_path / "results.jsonl")) == 4


def test_the_lock_records_the_holder_and_is_released(tmp_path: Path) -> None:
    with exclusive_writer(tmp_path / "run") as folder:
        info = json.loads((folder / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and abs(info["started"] - time.time()) < 60
        with exclusive_writer(tmp_path / "run"):  # re-entrant in the process that holds it
            pass
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""
    with exclusive_writer(tmp_path / "run"):  # free again
        pass


def test_a_file_given_as_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        with exclusive_writer(tmp_path / "f"):
            pass


def test_append_writes_one_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    append_result(path, {"a": 1})
    append_result(path, {"a": 2})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"a": 2}]


def test_unreadable_lines_are_reported_with_their_numbers(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_result(path, {"seed": 0})
    with path.open("ab") as handle:
        handle.write(b'[1, 2]\n\n{"seed": 1}\n\xff\xfe garbage\n{"seed": 2, "val')  # list, blank, ok, bytes, cut
    records, problems = read_results(path)
    assert [r["seed"] for r in records] == [0, 1]
    assert [number for number, _ in problems] == [2, 5, 6]
    assert "not an object" in problems[0][1] and "not UTF-8" in problems[1][1]
    assert "not a complete JSON object" in problems[2][1] and "interrupted" in problems[2][1]
    assert load_results(path) == records
    append_result(path, {"seed": 3})  # the next append starts on a fresh line after the cut one
    assert [r["seed"] for r in read_results(path).records] == [0, 1, 3]
    assert read_results(tmp_path / "missing.jsonl") == ([], [])


def test_deduplicate_prefers_ok_runs_then_the_latest() -> None:
    def run(seed: int, lr: float, finished: str, status: str | None = None, **extra: object) -> dict:
        record = {"task": "mqar", "config": {"dim": 8}, "mechanism": "softmax", "lr": lr, "seed": seed,
                  "finished": finished, **extra}
        return record if status is None else {**record, "status": status}

    records = [
        run(0, 1e-3, "2026-01-01T10:00:00", value=0.5),
        run(0, 1e-3, "2026-01-01T12:00:00", "failed", error="boom"),  # later, but failed: the ok one wins
        run(1, 1e-3, "2026-01-01T12:00:00", "failed", error="first try"),
        run(1, 1e-3, "2026-01-01T13:00:00", "failed", error="second try"),  # both failed: the latest wins
        run(0, 3e-3, "2026-01-01T09:00:00", "ok", value=0.6),
        run(0, 3e-3, "2026-01-01T11:00:00", "ok", value=0.7),  # both ok: the latest wins
        run(0, 3e-3, "2026-01-01T10:00:00", value=0.65),  # status missing = ok, but older
    ]
    kept = deduplicate(records, QUALITY_RECORD_KEY)
    assert [(r["seed"], r["lr"], r.get("value"), r.get("error")) for r in kept] == [
        (0, 1e-3, 0.5, None), (1, 1e-3, None, "second try"), (0, 3e-3, 0.7, None)]
    assert is_ok(records[0]) and not is_ok(records[1]) and is_ok(records[4])
