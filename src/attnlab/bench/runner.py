"""Running a list of quality-benchmark jobs and appending each record to ``results.jsonl``.

Three ways to run the same plan, with the same records in the end (each run seeds itself from its
own key in :func:`attnlab.bench.quality_jobs.run_job`, so nothing depends on which process ran it
or in which order):

- :func:`execute`: one job after the other in this process (``--workers 1``, and every torchrun
  rank of :mod:`attnlab.bench.ddp`);
- :func:`run_in_workers`: ``N`` worker processes (``--workers N``), each training one job at a time
  with its own intra-op threads; the parent alone appends to the results file, as each run finishes,
  and draws one progress display;
- :func:`attnlab.bench.ray_runner.run_on_ray`: one Ray task per job (``--ray``).

In all three a run that raises is recorded as failed (``"status": "failed"``, ``"error": "<Type>:
<message>"``, its key fields) without stopping the others; successful records carry ``"status":
"ok"``. Ctrl-C stops every worker and raises :class:`attnlab.cli_errors.Interrupted` saying how many
runs were saved (a rerun of the same command trains the rest, failed ones included).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab.bench.quality_jobs import Job, run_job
from attnlab.bench.results import append_result
from attnlab.cli_errors import Interrupted

__all__ = ["execute", "run_in_workers", "Recorder", "failed_record", "describe_error", "default_workers", "RunDisplay",
           "START_METHOD"]

# forkserver: the server imports torch and the benchmark once, and each worker forks from it (2.7-2.9 s
# for two ready workers on the 2-core machine, against 3.3-5.9 s with spawn, which imports torch
# again in every worker); plain fork is unsafe once this process has started torch's thread pools.
# Windows has no forkserver: spawn there.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# how often a worker reports its training step to the parent (seconds): enough for a live bar
STEP_REPORT_INTERVAL = 0.25


def default_workers() -> int:
    """The number of cores this process may use (its CPU affinity, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def describe_error(error: BaseException) -> str:
    """``"<Type>: <message>"``, what a failed record stores."""
    return f"{type(error).__name__}: {error}"


def failed_record(job: Job, error: str, *, device: str) -> dict[str, Any]:
    """The record of a run that raised: the job's key fields, ``status`` and ``error``."""
    return {**job.to_json(), "status": "failed", "error": error, "device": device,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class Recorder:
    """The one writer of a run's ``results.jsonl``: appends each finished record, counts what was saved.

    ``planned``: the runs of the whole plan; ``done_before``: those already complete in the file;
    ``resume_hint``: the end of the Ctrl-C message, how to carry on.
    """

    def __init__(self, results_path: Path, *, planned: int, done_before: int,
                 resume_hint: str = "rerun the same command to resume") -> None:
        self.results_path = Path(results_path)
        self.resume_hint = resume_hint
        self.planned = planned
        self.done_before = done_before
        self.records: list[dict[str, Any]] = []
        # where this run's appends start: Ctrl-C can land inside an append, after the line is on disk
        self._start = self.results_path.stat().st_size if self.results_path.exists() else 0

    def ok(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "status": "ok"}
        append_result(self.results_path, record)
        self.records.append(record)
        return record

    def failed(self, job: Job, error: str, *, device: str) -> dict[str, Any]:
        record = failed_record(job, error, device=device)
        append_result(self.results_path, record)
        self.records.append(record)
        return record

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "failed"]

    def _appended(self) -> list[dict[str, Any]]:
        """The complete records appended since this recorder started (read back from the file)."""
        if not self.results_path.exists():
            return []
        with self.results_path.open("rb") as handle:
            handle.seek(self._start)
            lines = handle.read().decode("utf-8", errors="replace").split("\n")
        records = []
        for line in lines[:-1]:  # the text after the last newline is a line still being written
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def interrupted(self) -> Interrupted:
        appended = self._appended()
        saved = self.done_before + sum(r.get("status") != "failed" for r in appended)
        failed = sum(r.get("status") == "failed" for r in appended)
        note = f" ({failed} failed, retried on rerun)" if failed else ""
        return Interrupted(f"interrupted; {saved} of {self.planned} runs saved in {self.results_path}{note}; "
                           f"{self.resume_hint}")


def _title(job: Job) -> str:
    return f"{job.task} {job.label} {job.mechanism} seed {job.seed}"


class RunDisplay:
    """One rich progress display: a bar over all runs and one line per run started."""

    def __init__(self, total: int, *, console: Any, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar = Progress(*columns, console=console, disable=not enabled, transient=False)
        self.overall = self.bar.add_task("all runs", total=total)
        self.rows: dict[int, Any] = {}

    def start(self, index: int, job: Job) -> None:
        self.rows[index] = self.bar.add_task(_title(job), total=job.config.steps)

    def step(self, index: int, step: int) -> None:
        if index in self.rows:
            self.bar.update(self.rows[index], completed=step)

    def finish(self, index: int, job: Job, record: dict[str, Any]) -> None:
        if record.get("status") == "failed":
            text = f"{_title(job)}: [red]failed[/red] ({record['error']})"
        else:
            text = f"{_title(job)}: {record['metric']}={record['value']:.4g}"
        if index in self.rows:
            # workers report their step at most every STEP_REPORT_INTERVAL: the last one may not have come
            steps = job.config.steps if record.get("status") == "ok" else None
            self.bar.update(self.rows[index], description=text, completed=steps)
        self.bar.update(self.overall, advance=1)

    def __enter__(self) -> RunDisplay:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)


def execute(jobs: Sequence[Job], *, results_path: Path, device: torch.device, progress: bool = True,
            console: Any = None, write: bool = True, after_job: Callable[[Job, nn.Module], None] | None = None,
            context_parallel: int = 1, recorder: Recorder | None = None,
            keep_going: bool = False) -> list[dict[str, Any]]:
    """Train ``jobs`` one after the other in this process, appending each record as it finishes.

    ``write=False``: train without writing (the torchrun ranks other than 0). ``keep_going=True``: a
    run that raises is recorded as failed and the next one starts (torchrun ranks keep ``False``: one
    rank skipping a job would leave the others waiting for it). Ctrl-C raises ``recorder.interrupted()``.
    Returns the records written.
    """
    recorder = recorder or Recorder(results_path, planned=len(jobs), done_before=0)
    written: list[dict[str, Any]] = []
    try:
        with RunDisplay(len(jobs), console=console, enabled=progress) as display:
            for index, job in enumerate(jobs):
                display.start(index, job)
                try:
                    result, model = run_job(job, device=device, on_step=lambda step, i=index: display.step(i, step),
                                            context_parallel=context_parallel)
                except Exception as error:
                    if not keep_going:
                        raise
                    record = recorder.failed(job, describe_error(error), device=str(device))
                    written.append(record)
                    display.finish(index, job, record)
                    continue
                record = {**result, "status": "ok"}
                if write:
                    record = recorder.ok(result)
                    written.append(record)
                if after_job is not None:
                    after_job(job, model)
                display.finish(index, job, record)
    except KeyboardInterrupt:  # during a run or between two: what was appended stays
        raise recorder.interrupted() from None
    return written


def _worker_device(device: str | None, worker: int) -> str:
    """``cuda`` without an index spreads the workers over the visible GPUs, one each in turn."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{worker % torch.cuda.device_count()}"
    return device or "cpu"


def _worker_main(worker: int, jobs: Any, results: Any, device: str, threads: int) -> None:
    """A worker process: train the jobs the parent sends, one at a time, and send back each record."""
    # Ctrl-C in a terminal reaches the whole process group; the parent alone decides what stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    while True:
        item = jobs.get()
        if item is None:
            return
        index, job = item
        last = 0.0

        def on_step(step: int, index: int = index) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= STEP_REPORT_INTERVAL:
                last = now
                results.put(("step", worker, index, step))

        try:
            record, _ = run_job(job, device=torch.device(device), on_step=on_step)
        except Exception as error:  # noqa: BLE001 - any error is this run's failure, recorded by the parent
            results.put(("failed", worker, index, describe_error(error)))
        else:
            results.put(("ok", worker, index, record))


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored while worker processes start (they inherit it) and while they are stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Pool:
    """``workers`` processes, each fed one job at a time through its own queue."""

    def __init__(self, workers: int, *, device: str | None, threads: int) -> None:
        context = multiprocessing.get_context(START_METHOD)
        if START_METHOD == "forkserver":
            context.set_forkserver_preload(["attnlab.bench.quality_jobs"])
        self.context = context
        self.device = device
        self.threads = threads
        self.results = context.Queue()
        self.processes: list[Any] = []
        self.inboxes: list[Any] = []
        self.devices: list[str] = []
        with _sigint_ignored():
            for worker in range(workers):
                self._start(worker)

    def _start(self, worker: int) -> None:
        inbox = self.context.Queue()
        device = _worker_device(self.device, worker)
        process = self.context.Process(target=_worker_main, args=(worker, inbox, self.results, device, self.threads),
                                       name=f"attnlab-worker-{worker}", daemon=True)
        process.start()
        if worker < len(self.processes):
            self.processes[worker], self.inboxes[worker], self.devices[worker] = process, inbox, device
        else:
            self.processes.append(process)
            self.inboxes.append(inbox)
            self.devices.append(device)

    def restart(self, worker: int) -> None:
        with _sigint_ignored():
            self._start(worker)

    def send(self, worker: int, item: Any) -> None:
        self.inboxes[worker].put(item)

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for process in self.processes:
            process.join(timeout=10)
        self.stop()

    def stop(self) -> None:
        """Terminate every worker still running (Ctrl-C, or an error in the parent)."""
        with _sigint_ignored():
            for process in self.processes:
                if process.is_alive():
                    process.terminate()
            for process in self.processes:
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                    process.join()
            for q in (*self.inboxes, self.results):
                q.cancel_join_thread()  # a queue's unsent data must not keep this process waiting
                q.close()


def run_in_workers(jobs: Sequence[Job], *, workers: int, recorder: Recorder, device: str | None = None,
                   threads: int = 1, progress: bool = True, console: Any = None) -> list[dict[str, Any]]:
    """Train ``jobs`` in ``workers`` processes (``threads`` intra-op threads each); this process
    appends each record through ``recorder`` as it arrives. A worker that dies (killed, out of memory)
    fails its run and is replaced. Ctrl-C stops the workers and raises ``recorder.interrupted()``.
    Returns the records written.

    The workers import attnlab afresh and know only the mechanisms attnlab registers itself: one
    registered at run time in this process is unknown to them (its runs fail with ``KeyError``);
    train such a mechanism with ``workers=1``.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    pending = list(enumerate(jobs))[::-1]  # popped from the end: plan order
    running: dict[int, tuple[int, Job]] = {}  # worker -> (index, job)
    written: list[dict[str, Any]] = []
    pool: _Pool | None = None
    try:
        with RunDisplay(len(jobs), console=console, enabled=progress) as display:
            pool = _Pool(min(workers, len(jobs)), device=device, threads=threads)

            def feed(worker: int) -> None:
                if pending:
                    index, job = pending.pop()
                    running[worker] = (index, job)
                    display.start(index, job)
                    pool.send(worker, (index, job))

            def record(worker: int, index: int, job: Job, kind: str, payload: Any) -> None:
                if kind == "ok":
                    written.append(recorder.ok(payload))
                else:
                    written.append(recorder.failed(job, payload, device=pool.devices[worker]))
                display.finish(index, job, written[-1])
                feed(worker)

            for worker in range(len(pool.processes)):
                feed(worker)
            checked = time.monotonic()
            while running:
                try:
                    kind, worker, index, payload = pool.results.get(timeout=1.0)
                except queue.Empty:
                    kind = None
                if time.monotonic() - checked >= 1.0:  # a worker killed mid-run sends nothing
                    checked = time.monotonic()
                    for dead, process in enumerate(pool.processes):
                        if dead in running and not process.is_alive():
                            dead_index, dead_job = running.pop(dead)
                            pool.restart(dead)
                            record(dead, dead_index, dead_job, "failed",
                                   f"WorkerDied: the worker process exited with code {process.exitcode} "
                                   f"during the run")
                if kind is None or worker not in running or running[worker][0] != index:
                    continue
                if kind == "step":
                    display.step(index, payload)
                    continue
                _, job = running.pop(worker)
                record(worker, index, job, kind, payload)
            pool.close()
    except KeyboardInterrupt:
        if pool is not None:
            pool.stop()
        raise recorder.interrupted() from None
    except BaseException:
        if pool is not None:
            pool.stop()
        raise
    return written
