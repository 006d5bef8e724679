"""Context parallelism on CPU: forward+backward time and bytes sent per rank, for each strategy, in one run.

Starts ``--world`` processes (gloo on 127.0.0.1, one thread each) and, for every sequence length and
strategy, measures on the same inputs:

- the time of one forward and backward pass of ``context_parallel_attention`` (the slowest rank), and of
  the op on the whole sequence in one process (one thread, rank 0, the others waiting): their ratio;
- the bytes each rank handed to ``torch.distributed`` (``attnlab.distributed.traffic``, the largest over
  ranks) against the formula of ``attnlab.distributed.strategy_bytes``;
- the bytes that crossed the loopback interface during the pass (``/proc/net/dev``, divided by the world
  size: gloo's framing included, and any other loopback traffic on the machine).

    python scripts/bench_context_parallel.py --lengths 16384,65536 --out runs/context_parallel.json

CPU timings on a shared machine are indicative only; the byte counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (label, strategy, mechanism, causal, layout, options)
CONFIGS: list[tuple[str, str, str, bool, str, dict[str, Any]]] = [
    ("ring softmax causal zigzag", "ring", "softmax", True, "zigzag", {}),
    ("ulysses softmax causal", "ulysses", "softmax", True, "contiguous", {}),
    ("state lightning", "state", "lightning", True, "contiguous", {"decay": 0.05}),
    ("state linear", "state", "linear", True, "contiguous", {}),
    ("halo sliding_window w=512 causal", "halo", "sliding_window", True, "contiguous", {"window": 512}),
    ("halo neighborhood k=511", "halo", "neighborhood", False, "contiguous", {"kernel_size": 511}),
]


def _loopback_bytes() -> int:
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])  # transmitted bytes
    except OSError:
        pass
    return -1


def _max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def _pass(function: Any, tensors: list[torch.Tensor]) -> float:
    for t in tensors:
        t.grad = None
    start = time.perf_counter()
    out = function()
    out.float().pow(2).mean().backward()
    return time.perf_counter() - start


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import attnlab
    from attnlab.distributed import context_parallel_attention, strategy_bytes, traffic
    from attnlab.distributed.halo import halo_reach

    rows = []
    B, H, Hkv, D = 1, args.heads, args.heads, args.head_dim
    for N in [1024 * world, *args.lengths]:  # the first length warms every code path up, untimed
        n = N // world
        for label, strategy, mechanism, causal, layout, options in CONFIGS:
            if args.only and not any(word in label for word in args.only):
                continue
            generator = torch.Generator().manual_seed(N + rank)
            q = torch.randn(B, H, n, D, generator=generator, requires_grad=True)
            k = torch.randn(B, Hkv, n, D, generator=generator, requires_grad=True)
            v = torch.randn(B, Hkv, n, D, generator=generator, requires_grad=True)
            if mechanism == "linear":  # keep the normaliser away from zero at any length
                options = {**options, "feature_map": "elu+1"}
            times, sent, loopback = [], 0, 0
            for _ in range(args.repeats):
                dist.barrier()
                before = _loopback_bytes() if rank == 0 else 0
                call = functools.partial(context_parallel_attention, q, k, v, mechanism=mechanism,
                                         strategy=strategy, layout=layout, causal=causal, **options)
                with traffic() as counter:
                    elapsed = _pass(call, [q, k, v])
                times.append(_max_over_ranks(elapsed))
                dist.barrier()
                if rank == 0:
                    loopback = (_loopback_bytes() - before) // world
                sent = int(_max_over_ranks(counter.total))
            chunk = n // (2 if layout == "zigzag" else 1)
            reach = ((0, 0) if strategy != "halo"
                     else halo_reach(mechanism, length=N, causal=causal, options=options, chunk=chunk))
            formula = strategy_bytes(strategy, mechanism=mechanism, world=world, batch=B, heads=H, kv_heads=Hkv,
                                     local_length=n, head_dim=D, value_dim=D, layout=layout, reach=reach)
            single = float("nan")
            if rank == 0 and not args.no_baseline:  # the op on the whole sequence, one process, one thread
                whole = [torch.randn(B, h, N, D, generator=generator, requires_grad=True) for h in (H, Hkv, Hkv)]
                call = functools.partial(attnlab.get(mechanism), *whole, causal=causal, **options)
                single = min(_pass(call, whole) for _ in range(args.repeats))
            dist.barrier()
            row = {"N": N, "world": world, "label": label, "strategy": strategy, "mechanism": mechanism,
                   "layout": layout, "B": B, "H": H, "H_kv": Hkv, "D": D, "cp_seconds": min(times),
                   "single_seconds": single, "bytes_per_rank": sent, "formula_bytes": formula,
                   "loopback_bytes_per_rank": loopback}
            if N == 1024 * world and N not in args.lengths:
                continue  # warm-up
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        _print_table(rows)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def _print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| N | strategy (mechanism) | CP fwd+bwd s | 1 process s | ratio | sent MiB/rank | formula MiB "
          "| loopback MiB/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["single_seconds"] / r["cp_seconds"] if r["single_seconds"] == r["single_seconds"] else float("nan")
        print(f"| {r['N']} | {r['label']} | {r['cp_seconds']:.2f} | {r['single_seconds']:.2f} | {ratio:.2f}x "
              f"| {_mib(r['bytes_per_rank'])} | {_mib(r['formula_bytes'])} | {_mib(r['loopback_bytes_per_rank'])} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated words; run the configs whose label has one")
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-process op")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.only = [w for w in args.only.split(",") if w]
    for N in args.lengths:
        if N % (2 * args.world):
            parser.error(f"--lengths: {N} is not a multiple of 2 * world = {2 * args.world}")
    if args.heads % args.world:
        parser.error(f"--heads={args.heads} must be a multiple of --world={args.world} (Ulysses splits heads)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, world {args.world}, load average {os.getloadavg()[0]:.1f}", flush=True)
    mp.start_processes(_worker, args=(args.world, port, args), nprocs=args.world, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
