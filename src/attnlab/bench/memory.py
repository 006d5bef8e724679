"""Peak memory of one call: the CUDA allocator's peak, or the CPU's peak resident set.

On the CPU the reliable figure comes from a fresh Python process per call
(:func:`cpu_peak_memory_subprocess`, whose child is :mod:`attnlab.bench.memory_child`): the peak
resident set (Linux ``VmHWM``, reset after the inputs are built) above the resident set read just
before the inputs are built, after a warm-up call of the same cell at a short length; so neither the
interpreter and its libraries nor what a first call loads once are counted. Both figures count the
inputs (and their gradients) as well as what the call allocates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import attnlab

__all__ = ["cuda_peak_memory", "cpu_peak_memory_inline", "cpu_peak_memory_subprocess", "MMAP_THRESHOLD",
           "MEMORY_RESOLUTION_BYTES", "WARMUP_LENGTH"]

WARMUP_LENGTH = 128  # the fresh process warms up on the same cell at this length (or shorter) first


def cuda_peak_memory(setup: Callable[[], Callable[[], Any]], device: str | torch.device = "cuda") -> int:
    """Peak bytes the CUDA allocator held while ``setup()`` built the inputs and the call ran, above
    what was allocated before ``setup``."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    fn = setup()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


MMAP_THRESHOLD = 128 * 1024
# Below this, a figure may be the allocator reusing memory it already held: shown as "< 0.25 MiB".
MEMORY_RESOLUTION_BYTES = 2 * MMAP_THRESHOLD


def fix_malloc_threshold() -> None:
    """Make glibc return every block >= 128 KiB to the system when freed (no dynamic threshold).

    Otherwise a freed large block raises glibc's mmap threshold and a later call reuses resident heap
    memory unseen by the peak-RSS mark. Ignored where glibc's ``mallopt`` is absent.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def cpu_peak_memory_inline(setup: Callable[[], Callable[[], Any]], *, warmup: bool = True,
                           warmup_setup: Callable[[], Callable[[], Any]] | None = None) -> int:
    """Peak resident bytes of one call above this process's resident set just before ``setup()`` builds
    the inputs (so the inputs count, and nothing the process held before does).

    ``warmup``: first run one call built by ``warmup_setup`` (a smaller cell of the same kind), else by
    ``setup``, and free it, all before the baseline is read: what a first call loads once (library code
    pages, thread pools, allocator arenas) then sits in the baseline instead of in the figure. The
    kernel's peak mark is reset after ``setup()``, so the figure is the larger of the inputs and the
    call's peak. Resolution: blocks under :data:`MMAP_THRESHOLD` may reuse memory the allocator already
    holds and go unseen, so figures under :data:`MEMORY_RESOLUTION_BYTES` are not resolved.
    """
    import gc

    fix_malloc_threshold()
    if warmup:
        warm = (warmup_setup or setup)()
        warm()
        del warm
    gc.collect()
    before = _proc_status_kb("VmRSS")
    fn = setup()
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs): no CPU memory figure")
    fn()
    return max(0, _proc_status_kb("VmHWM") - before) * 1024


def cpu_peak_memory_subprocess(spec: Mapping[str, Any], *, timeout: float = 300.0) -> int:
    """Peak resident bytes of one benchmark cell above the fresh Python process's own, measured there.

    ``spec`` is a cell description (:func:`attnlab.bench.cells.cell_spec`); the child
    (:mod:`attnlab.bench.memory_child`) warms up on the same cell at N <= :data:`WARMUP_LENGTH`, then
    builds the inputs and runs the call, measures with :func:`cpu_peak_memory_inline` and prints the
    figure as JSON.
    """
    env = dict(os.environ)
    src = str(Path(attnlab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # fixed threshold from the start (see above)
    result = subprocess.run([sys.executable, "-m", "attnlab.bench.memory_child", json.dumps(dict(spec))],
                            capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory subprocess failed: {tail}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])
