"""Atomic writes: the target holds the old or the new content, never a part, and no temporary is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnlab.files import atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.html"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new content")
    assert target.read_text() == "new content"
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "table.md"
    atomic_write_text(target, "old")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("attnlab.files.os.replace", fail)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"half")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_the_file_gets_the_permissions_open_would_give(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        target = atomic_write_text(tmp_path / "report.html", "x")
    finally:
        os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o644
