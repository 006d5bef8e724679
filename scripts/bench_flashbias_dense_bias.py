"""FlashBias (rank-2 causal ALiBi factors, one SDPA call) versus SDPA with a dense float bias.

``attnlab bench speed`` times flashbias against its own dense reference; this script adds the
usual baseline, ``F.scaled_dot_product_attention(attn_mask=<dense float ALiBi bias>)``,
plus plain causal SDPA (no bias) as the floor. Every cell runs in a fresh subprocess: time (median
of repeated calls after a warm-up, ``attnlab.bench.timing.time_callable``), peak resident memory above
the process before the inputs were built (``cpu_peak_memory_inline``: the dense bias counts), and
the largest single allocation of one call (torch profiler) to show whether an ``N x M`` tensor exists.

    .venv/bin/python scripts/bench_flashbias_dense_bias.py --length 4096 --heads 4 --dim 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

CELLS = ("flashbias", "sdpa_dense_bias", "sdpa_causal_no_bias")


def build(cell: str, *, N: int, H: int, D: int, mode: str):  # noqa: ANN201
    from attnlab.ops import alibi_bias, alibi_bias_factors, flashbias_attention

    g = torch.Generator().manual_seed(0)
    grad = mode == "fwdbwd"
    q, k, v = (torch.randn(1, H, N, D, generator=g).requires_grad_(grad) for _ in range(3))
    if cell == "flashbias":
        q_bias, k_bias = alibi_bias_factors(H, N)

        def call() -> torch.Tensor:
            return flashbias_attention(q, k, v, q_bias=q_bias, k_bias=k_bias, causal=True)
    elif cell == "sdpa_dense_bias":
        bias = alibi_bias(H, N, dtype=torch.float32)  # (1, H, N, N)
        bias = bias.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))

        def call() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        def call() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def run() -> None:
        out = call()
        if grad:
            out.backward(torch.ones_like(out))
            for x in (q, k, v):
                x.grad = None

    return run


def child(cell: str, N: int, H: int, D: int, mode: str, threads: int | None) -> None:
    from torch.profiler import ProfilerActivity, profile

    from attnlab.bench.memory import cpu_peak_memory_inline
    from attnlab.bench.timing import time_callable

    if threads:
        torch.set_num_threads(threads)
    peak = cpu_peak_memory_inline(lambda: build(cell, N=N, H=H, D=D, mode=mode))
    run = build(cell, N=N, H=H, D=D, mode=mode)
    timing = time_callable(run, warmup=1, repeats=3, max_repeats=5, min_seconds=1.0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    print(json.dumps({"cell": cell, "mode": mode, "N": N, "ms": timing.median_ms, "peak_bytes": peak,
                      "largest_allocation_bytes": largest, "n_by_m_float32_bytes": H * N * N * 4}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cell", choices=CELLS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        child(args.cell, args.length, args.heads, args.dim, args.mode, args.threads)
        return
    print(f"CPU float32, B=1, H={args.heads}, D={args.dim}, N=M={args.length}, causal ALiBi "
          f"(torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads)")
    print("| cell | mode | ms | peak MiB | largest allocation MiB | N x M float32 MiB |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for cell in CELLS:
            command = [sys.executable, __file__, "--cell", cell, "--mode", mode, "--length", str(args.length),
                       "--heads", str(args.heads), "--dim", str(args.dim)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {cell} | {mode} | error: {done.stderr.strip().splitlines()[-1:]} | | | |")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            mib = 2.0**20
            print(f"| {cell} | {mode} | {row['ms']:.1f} | {row['peak_bytes'] / mib:.1f} | "
                  f"{row['largest_allocation_bytes'] / mib:.1f} | {row['n_by_m_float32_bytes'] / mib:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
