"""Which chunk size is fastest for chunked lightning / linear attention on this machine?

Times forward + backward (float32, causal, B=1, H=4, D=64) of ``lightning_attention`` (TNL decay
slopes) and ``linear_attention`` (elu+1, normalised) for several ``chunk_size`` values, all in one
process, median of ``--repeats`` runs. ``attnlab bench speed`` has no chunk-size option, hence this script.

Run: .venv/bin/python scripts/linear_family_chunks.py --length 16384 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnlab.ops import lightning_attention, lightning_decay_slopes, linear_attention


def fwd_bwd_seconds(fn, q, k, v, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        for x in (q, k, v):
            x.grad = None
        start = time.perf_counter()
        fn(q, k, v).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--chunks", default="16,32,64,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, args.length, 64, generator=g).requires_grad_() for _ in range(3))
    decay = lightning_decay_slopes(4)
    print(f"N={args.length}, B=1, H=4, D=64, float32, causal, fwd+bwd, median of {args.repeats}, "
          f"torch threads={torch.get_num_threads()}")
    print("| chunk_size | lightning (s) | linear (s) |")
    print("|---|---|---|")
    for chunk in (int(c) for c in args.chunks.split(",")):
        light = fwd_bwd_seconds(lambda q, k, v, c=chunk: lightning_attention(q, k, v, decay=decay, chunk_size=c),
                                q, k, v, args.repeats)
        lin = fwd_bwd_seconds(lambda q, k, v, c=chunk: linear_attention(q, k, v, causal=True, chunk_size=c),
                              q, k, v, args.repeats)
        print(f"| {chunk} | {light:.3f} | {lin:.3f} |", flush=True)


if __name__ == "__main__":
    main()
