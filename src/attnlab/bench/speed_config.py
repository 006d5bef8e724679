"""What a speed sweep measures: :class:`SpeedConfig`, the named presets and the result-file fields.

The runner (:mod:`attnlab.bench.speed`), the report (:mod:`attnlab.bench.speed_report`) and the
memory subprocess all read these; this module imports nothing from the rest of ``attnlab.bench``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

__all__ = ["RESULTS_FILE", "BASELINE", "MODES", "KEY_FIELDS", "DTYPES", "SpeedConfig", "PRESETS", "resolve_config"]

RESULTS_FILE = "speed.jsonl"
BASELINE = "softmax"
MODES = ("fwd", "fwdbwd")
KEY_FIELDS = ("kind", "mechanism", "impl", "path", "N", "mode", "causal", "batch", "heads", "dim", "dtype",
              "device")


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SpeedConfig:
    """One benchmark sweep.

    Attributes:
        lengths: sequence lengths N (keys = queries, self-attention).
        batch: B; ignored when ``tokens`` is set (then ``B = tokens // N``, a constant work per call).
        heads, dim: H and the head dim D of q, k, v.
        dtype: "float32", "bfloat16", "float16".
        modes: "fwd" and/or "fwdbwd" (forward plus backward of a random output gradient).
        causal: time the causal form where the mechanism defines one (else its bidirectional form).
        impls: the impls to time per op ("auto" by default; "all" = auto + every registered fast path).
        warmup, repeats: calls before timing and timed calls (CPU; on a GPU milliseconds of
            ``do_bench`` warm-up / repeat: ``gpu_warmup_ms``, ``gpu_rep_ms``).
        min_seconds: on the CPU, keep repeating (up to ``max_repeats``) until this much time was measured.
        max_seconds: on the CPU, stop repeating after this long per cell (at least one timed call).
        threads: torch CPU threads during the sweep (``None``: torch's default).
        memory: "subprocess" (CPU: fresh process per cell), "inline" (CPU: same process, peak RSS
            reset before the call; approximate), "none"; on a GPU always the CUDA allocator's peak.
        memory_limit_gb: cells whose estimate exceeds it are skipped (default: 60% of available memory).
        max_cell_seconds: cells whose predicted single-call time exceeds it are skipped.
        externals: optional external baselines tried when installed ("fla", "natten", "flex").
        device: "cpu" or "cuda" (default: cuda when available, else cpu).
        mechanisms: what the preset times when the caller names none (``None``: every registered one).
        length_cap, length_cap_exempt: series of mechanisms not in ``length_cap_exempt`` (and not the
            softmax baseline) stop at ``N <= length_cap``; longer cells are recorded as skipped with
            that reason. A preset with a time budget runs the O(N) mechanisms and softmax far enough to
            show where they overtake it, and the rest only to the cap.
        max_total_seconds: once the sweep has run this long, the cells left are recorded as skipped
            for want of time; a rerun of the same command runs them.
    """

    lengths: tuple[int, ...] = (256, 1024, 4096)
    batch: int = 1
    heads: int = 4
    dim: int = 64
    dtype: str = "float32"
    modes: tuple[str, ...] = ("fwd", "fwdbwd")
    causal: bool = True
    impls: tuple[str, ...] = ("auto",)
    tokens: int | None = None
    warmup: int = 1
    repeats: int = 3
    max_repeats: int = 20
    min_seconds: float = 0.5
    max_seconds: float = math.inf
    threads: int | None = None
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    memory: str = "subprocess"
    memory_limit_gb: float | None = None
    max_cell_seconds: float = 20.0
    externals: tuple[str, ...] = ("fla", "natten", "flex")
    device: str | None = None
    seed: int = 0
    mechanisms: tuple[str, ...] | None = None
    length_cap: int | None = None
    length_cap_exempt: tuple[str, ...] = ()
    max_total_seconds: float = math.inf

    def batch_for(self, length: int) -> int:
        return max(1, self.tokens // length) if self.tokens else self.batch


PRESETS: dict[str, SpeedConfig] = {
    # seconds, for tests: tiny sizes, no memory subprocesses
    "smoke": SpeedConfig(lengths=(32, 64), heads=2, dim=16, modes=("fwd",), repeats=2, max_repeats=3,
                         min_seconds=0.0, max_seconds=0.5, memory="none", max_cell_seconds=0.5, externals=()),
    # what the demo runs (about a minute of one core): softmax and the O(N) mechanisms to N=8192, far enough
    # to see them overtake softmax, the demo's other mechanisms to N=2048; in-process memory
    "demo": SpeedConfig(lengths=(256, 512, 1024, 2048, 4096, 8192), heads=4, dim=32, modes=("fwd", "fwdbwd"),
                        warmup=1, repeats=2, max_repeats=3, min_seconds=0.0, max_seconds=1.0, memory="inline",
                        max_cell_seconds=3.0, externals=(), threads=1,
                        mechanisms=("softmax", "lightning", "linear", "flow", "lightnet", "sliding_window", "tnl",
                                    "agent", "neighborhood", "flashbias", "moh", "deconstructed"),
                        length_cap=2048,
                        length_cap_exempt=("lightning", "linear", "flow", "lightnet", "sliding_window", "tnl"),
                        max_total_seconds=150.0),  # a guard for a loaded machine: about 65 s of one idle core
    # the CPU table of docs/benchmarks.md: B=1, H=4, D=64, float32, causal, 1k-16k tokens
    "cpu": SpeedConfig(lengths=(1024, 4096, 16384), heads=4, dim=64, modes=("fwd", "fwdbwd"),
                       repeats=3, max_repeats=10, min_seconds=0.5, max_seconds=60.0, memory="subprocess",
                       max_cell_seconds=15.0,
                       externals=("natten",)),
    # the anchor shape of docs/benchmarks.md: bf16, H=16, D=128, 65,536 tokens per call
    "gpu": SpeedConfig(lengths=(1024, 4096, 16384, 65536), tokens=65536, heads=16, dim=128, dtype="bfloat16",
                       modes=("fwd", "fwdbwd"), memory="cuda", max_cell_seconds=5.0, device="cuda"),
}


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_config(preset: str | SpeedConfig, overrides: Mapping[str, Any]) -> SpeedConfig:
    if isinstance(preset, SpeedConfig):
        config = preset
    else:
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not one of {', '.join(PRESETS)}")
        config = PRESETS[preset]
    fields = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(fields) - set(asdict(config))
    if unknown:
        raise TypeError(f"unknown speed benchmark option(s): {', '.join(sorted(unknown))}")
    for name in ("lengths", "modes", "impls", "externals", "mechanisms", "length_cap_exempt"):
        if name in fields:
            fields[name] = tuple(fields[name])
    config = replace(config, **fields)
    if config.device is not None and config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} but no CUDA device is available (the 'gpu' preset needs one; "
                         f"use --preset cpu here)")
    if config.device is None:
        config = replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
    bad_modes = [m for m in config.modes if m not in MODES]
    if bad_modes:
        raise ValueError(f"modes={list(config.modes)}: {bad_modes} not in {list(MODES)}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype={config.dtype!r} is not one of {', '.join(DTYPES)}")
    if not config.lengths or min(config.lengths) < 1:
        raise ValueError(f"lengths must be positive integers, got {list(config.lengths)}")
    if config.memory not in ("subprocess", "inline", "none", "cuda"):
        raise ValueError(f"memory={config.memory!r} is not one of 'subprocess', 'inline', 'none', 'cuda'")
    return replace(config, lengths=tuple(sorted(set(config.lengths))))
