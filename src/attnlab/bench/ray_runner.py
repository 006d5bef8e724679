"""``--ray [ADDRESS]``: the quality benchmark's runs as Ray tasks, on a local Ray instance or a cluster.

The driver (the ``attnlab bench quality`` process) validates and plans as usual, submits one Ray
task per pending run with its resource request (``threads`` CPUs, and one GPU when the device is
``cuda``), and waits for them with ``ray.wait``: each record is appended to ``results.jsonl`` by the
driver alone, as its task finishes, so the results file lives on the driver's machine and the
workers only train. A driver restarted with the same command skips the runs already in the file, as
a local run does. Ray is an optional dependency (``pip install 'attnlab[ray]'``); the Ray workers
need attnlab installed in the same version as the driver. See ``docs/parallel.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnlab.bench.quality_jobs import Job
from attnlab.bench.runner import Recorder, RunDisplay, describe_error
from attnlab.cli_errors import UsageError

__all__ = ["run_on_ray", "train_remote", "LOCAL"]

LOCAL = "local"  # ``--ray`` without an address: a Ray instance started here, stopped at the end


def train_remote(job: Job, device: str, threads: int) -> tuple[str, Any]:
    """The body of one Ray task: ``("ok", record)`` or ``("failed", "<Type>: <message>")``."""
    import torch

    from attnlab.bench.quality_jobs import run_job

    torch.set_num_threads(threads)
    try:
        record, _ = run_job(job, device=torch.device(device))
    except Exception as error:  # noqa: BLE001 - any error is this run's failure, recorded by the driver
        return "failed", describe_error(error)
    return "ok", record


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, which is not installed: pip install 'attnlab[ray]' "
                         "(or run without --ray)") from None
    return ray


def run_on_ray(jobs: Sequence[Job], *, address: str, recorder: Recorder, device: str | None = None,
               threads: int = 1, local_cpus: int = 1, progress: bool = True,
               console: Any = None) -> list[dict[str, Any]]:
    """Train ``jobs`` as Ray tasks and append each record through ``recorder`` as it arrives.

    ``address``: a Ray cluster's address (``"auto"``, ``"ray://head:10001"``, ``"head:6379"``), or
    :data:`LOCAL` for a Ray instance started in this process with ``local_cpus`` CPUs (and stopped at
    the end). When Ray is already initialised in this process, its connection is used as it is.
    Ctrl-C cancels the tasks still running and raises ``recorder.interrupted()``. Returns the records
    written.
    """
    ray = _import_ray()
    device = device or "cpu"
    started_here = not ray.is_initialized()
    if started_here:
        if address == LOCAL:
            ray.init(num_cpus=local_cpus, include_dashboard=False, logging_level="warning", log_to_driver=False)
        else:
            try:
                ray.init(address=address, logging_level="warning")
            except ConnectionError as error:
                raise UsageError(f"--ray {address}: no Ray cluster answers there ({error}); start one with "
                                 f"`ray start --head` (docs/parallel.md) or give its address") from None
    written: list[dict[str, Any]] = []
    remote = ray.remote(train_remote).options(num_cpus=threads, num_gpus=1 if device.startswith("cuda") else 0,
                                              max_retries=0)
    try:
        running = {remote.remote(job, device, threads): (index, job) for index, job in enumerate(jobs)}
        with RunDisplay(len(jobs), console=console, enabled=progress) as display:
            try:
                while running:
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                    for ref in ready:
                        index, job = running.pop(ref)
                        try:
                            status, payload = ray.get(ref)
                        except Exception as error:  # noqa: BLE001 - the task's process died (a Ray error)
                            status, payload = "failed", describe_error(error)
                        if status == "ok":
                            record = recorder.ok(payload)
                        else:
                            record = recorder.failed(job, payload, device=device)
                        written.append(record)
                        display.start(index, job)
                        display.finish(index, job, record)
            except KeyboardInterrupt:
                for ref in running:
                    ray.cancel(ref, force=True)
                raise recorder.interrupted() from None
    finally:
        if started_here:
            ray.shutdown()
    return written
