"""Every registered mechanism is documented in docs/mechanisms.md; the README example runs."""

from __future__ import annotations

import re
from pathlib import Path

import attnlab

ROOT = Path(__file__).resolve().parents[1]


def test_every_mechanism_has_a_section() -> None:
    text = (ROOT / "docs" / "mechanisms.md").read_text()
    sections = set(re.findall(r"^## (\S+)", text, flags=re.M))
    missing = [m.name for m in attnlab.mechanisms() if m.name not in sections]
    assert not missing, f"docs/mechanisms.md has no '## name' section for: {', '.join(missing)}"


def test_readme_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
