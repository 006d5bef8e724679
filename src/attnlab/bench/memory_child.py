"""The child process of :func:`attnlab.bench.memory.cpu_peak_memory_subprocess`.

``python -m attnlab.bench.memory_child SPEC_JSON`` builds the cell that ``SPEC_JSON`` describes
(:func:`attnlab.bench.cells.build_cell`), measures the peak resident set of one call above the
process's own (read after a warm-up call of the same cell at a short length, before the inputs are
built) and prints ``{"peak_bytes": ...}`` as the last line of its output.
"""

from __future__ import annotations

import json
import sys

from attnlab.bench.cells import build_cell
from attnlab.bench.externals import EXTERNALS
from attnlab.bench.memory import WARMUP_LENGTH, cpu_peak_memory_inline

__all__ = ["main"]


def main(spec_json: str) -> int:
    """Build the cell, measure its peak RSS, print JSON."""
    spec = json.loads(spec_json)
    externals = [e for e in EXTERNALS if e.name == spec["mechanism"]]
    # The warm-up runs the same cell at a short length: it loads the code and the thread pools that the
    # measured call would otherwise count (the interpreter's own memory), at a small fraction of its cost.
    short = {**spec, "N": min(int(spec["N"]), WARMUP_LENGTH)}
    try:
        build_cell(short, externals=externals)()
        warm = True
    except Exception:  # a mechanism that needs a longer sequence: warm up on the cell itself
        warm = False
    peak = cpu_peak_memory_inline(lambda: build_cell(spec, externals=externals), warmup=not warm)
    print(json.dumps({"peak_bytes": peak}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m attnlab.bench.memory_child SPEC_JSON (run by attnlab bench speed)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
