"""``--nproc N``: the quality benchmark's training through torchrun and DistributedDataParallel.

The parent process has already validated the request; :func:`launch` writes the pending jobs to a
JSON file and starts ``python -m torch.distributed.run --standalone --nproc_per_node N -m
attnlab.bench.ddp ...``. Every worker joins the process group (gloo on CPU, nccl on GPU) and trains
each job with its model wrapped in :class:`torch.nn.parallel.DistributedDataParallel` (each rank draws
its own share of every batch; gradients are averaged); rank 0 appends the records to
``results.jsonl``. ``--save-parameters`` makes every rank save its final parameters (the test that
both ranks end equal reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["launch", "main", "worker_command"]


def worker_command(jobs_file: Path, *, out_dir: Path, nproc: int, device: str | None = None,
                   save_parameters: bool = False, context_parallel: int = 1) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "attnlab.bench.ddp", "--jobs", str(jobs_file), "--out", str(out_dir)]
    if device:
        command += ["--device", device]
    if save_parameters:
        command.append("--save-parameters")
    if context_parallel > 1:
        command += ["--context-parallel", str(context_parallel)]
    return command


def launch(jobs: Sequence[object], *, out_dir: str | Path, nproc: int, device: str | None = None,
           save_parameters: bool = False, timeout: float | None = None, context_parallel: int = 1) -> None:
    """Train ``jobs`` (:class:`attnlab.bench.quality_jobs.Job`) on ``nproc`` processes; raises if torchrun fails.

    ``context_parallel=C``: groups of ``C`` consecutive ranks split each sequence (``nproc / C`` replicas).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out_dir, delete=False) as handle:
        json.dump([job.to_json() for job in jobs], handle)
        jobs_file = Path(handle.name)
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        completed = subprocess.run(worker_command(jobs_file, out_dir=out_dir, nproc=nproc, device=device,
                                                  save_parameters=save_parameters,
                                                  context_parallel=context_parallel),
                                   env=environment, timeout=timeout)
    finally:
        jobs_file.unlink(missing_ok=True)
    if completed.returncode != 0:
        raise RuntimeError(f"torchrun with {nproc} processes failed (exit code {completed.returncode})")


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (run by torchrun, one process per rank)."""
    parser = argparse.ArgumentParser(prog="attnlab.bench.ddp")
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--save-parameters", action="store_true")
    parser.add_argument("--context-parallel", type=int, default=1)
    args = parser.parse_args(argv)

    from attnlab.bench.quality_jobs import Job
    from attnlab.bench.runner import execute

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        jobs = [Job.from_json(item) for item in json.loads(args.jobs.read_text())]
        is_main = torch.distributed.get_rank() == 0

        def save(job: Job, model: torch.nn.Module) -> None:
            if args.save_parameters:
                name = f"parameters-{job.task}-{job.mechanism}-seed{job.seed}-rank{torch.distributed.get_rank()}.pt"
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.out / name)

        execute(jobs, results_path=args.out / "results.jsonl", device=device, progress=is_main, write=is_main,
                after_job=save, context_parallel=args.context_parallel)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
