"""The quality benchmark: train every (task, mechanism, seed, config) and append one JSON line each.

Everything the runner does with a mechanism goes through the registry (``attnlab.mechanisms()`` /
``attnlab.get()``), so mechanisms registered later are picked up without changes here. Before any
training starts, every requested (task, mechanism) pair is checked: unknown names, mechanisms whose
role is not "mixer", non-causal mechanisms for a language model, causal-only ones for an encoder, and
mechanisms whose model cannot be built or run at the task's sizes are refused with the reason.

The tasks are in :mod:`attnlab.bench.quality_tasks`, one job in :mod:`attnlab.bench.quality_jobs`,
the loops over jobs (in this process, in worker processes, on Ray) in :mod:`attnlab.bench.runner`,
the training loop in :mod:`attnlab.bench.training`; this module validates, plans, resumes and runs
(or hands the jobs to torchrun with :mod:`attnlab.bench.ddp`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import attnlab
from attnlab.bench.ddp import launch
from attnlab.bench.presets import QualityPreset, check_learning_rates, get_preset
from attnlab.bench.quality_jobs import RESULT_KEY, Job
from attnlab.bench.quality_tasks import TASKS, QualityTask
from attnlab.bench.results import completed_keys, exclusive_writer, load_results, result_key
from attnlab.bench.runner import Recorder, execute, run_in_workers
from attnlab.cli_errors import UsageError
from attnlab.mechanism_spec import MechanismSpec, model_spec, parse_spec
from attnlab.registry import Mechanism

__all__ = ["Refusal", "plan_jobs", "validate", "run_quality", "QualityError", "QualityResults", "NothingToRun",
           "fitting_mechanisms", "pending_jobs", "check_device", "check_steps"]


class QualityError(UsageError):
    """A request the benchmark refuses before training (unknown names, mechanisms that do not fit, a run
    that would train nothing); the command line shows it as one line and exits 2."""


class NothingToRun(QualityError):
    """A plan of 0 runs: no mechanism given, or every (task, mechanism) pair refused."""


class QualityResults(list):
    """The successful records of a plan (a ``list``), with ``failed``: the records of the plan's runs
    whose latest attempt raised (their ``error`` says why; a rerun retries them)."""

    def __init__(self, records: Sequence[dict[str, Any]] = (), failed: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(records)
        self.failed: list[dict[str, Any]] = list(failed)


@dataclass(frozen=True)
class Refusal:
    task: str
    mechanism: str
    reason: str

    def __str__(self) -> str:
        return f"{self.mechanism} on {self.task}: {self.reason}"


def _probe(task: QualityTask, config: Any, record: Mechanism, options: Mapping[str, Any]) -> str | None:
    """Build the task's model with this mechanism and its options and run one tiny forward/backward;
    the error, or None."""
    try:
        torch.manual_seed(0)
        model = task.build(config, record.name, task.causal_for(record), **options)
        out = model(task.probe(config))
        out.float().square().mean().backward()
        if not torch.isfinite(out).all():
            return "the model's output is not finite on random inputs"
    except Exception as error:  # noqa: BLE001 - any failure means the mechanism cannot run this task
        return f"the model cannot be built or run at the task's sizes: {type(error).__name__}: {error}"
    return None


def validate(tasks: Sequence[str], mechanisms: Sequence[str], preset: QualityPreset, *,
             probe: bool = True) -> list[Refusal]:
    """Every reason to refuse a (task, mechanism) pair before training; ``[]`` when all fit.

    ``mechanisms`` are mechanism specs (a registered name, or one with options:
    :mod:`attnlab.mechanism_spec`). Unknown task or mechanism names and options a mechanism does
    not take raise :class:`QualityError` right away.
    """
    unknown_tasks = [t for t in tasks if t not in TASKS]
    if unknown_tasks:
        raise QualityError(f"unknown task(s) {', '.join(map(repr, unknown_tasks))} (tasks: {', '.join(TASKS)})")
    missing = [t for t in tasks if t not in preset.tasks]
    if missing:
        raise QualityError(f"preset {preset.name!r} has no config for task(s) {', '.join(missing)}")
    specs: list[tuple[str, MechanismSpec]] = []
    for text in mechanisms:
        try:
            specs.append((text, model_spec(text)))
        except (KeyError, TypeError, ValueError) as error:
            raise QualityError(error.args[0]) from None
    refusals = []
    for task_name in tasks:
        task = TASKS[task_name]
        for text, spec in specs:
            record = attnlab.get(spec.name)
            reason = task.refusal(record)
            if reason is None and probe:
                for config in preset.tasks[task_name]:
                    reason = _probe(task, config, record, spec.options)
                    if reason is not None:
                        break
            if reason is not None:
                refusals.append(Refusal(task_name, text, reason))
    return refusals


def fitting_mechanisms(task: str, preset: QualityPreset, candidates: Sequence[str] | None = None) -> list[str]:
    """The registered mechanisms (or ``candidates``) that can run ``task`` under ``preset``."""
    names = [m.name for m in attnlab.mechanisms()] if candidates is None else list(candidates)
    refused = {r.mechanism for r in validate([task], names, preset)}
    return [n for n in names if n not in refused]


def _context_parallel_refusals(tasks: Sequence[str], per_task: Mapping[str, Sequence[str]], preset: QualityPreset,
                               context_parallel: int) -> list[str]:
    """Why ``--context-parallel`` cannot run these jobs: decoder tasks, functional ops, no short convolution."""
    if context_parallel < 1:
        return [f"context_parallel={context_parallel} must be at least 1"]
    if context_parallel == 1:
        return []
    refusals = []
    for task in tasks:
        if TASKS[task].masking != "causal":
            refusals.append(f"--context-parallel splits the sequences of decoder tasks; {task!r} is not one")
            continue
        for config in preset.tasks.get(task, []):
            if getattr(config, "short_conv", 0):
                refusals.append(f"--context-parallel: {task} {TASKS[task].label(config)} has a short convolution, "
                                f"which reads tokens across shards")
        for mechanism in per_task.get(task, []):
            if attnlab.get(parse_spec(mechanism).name).layer is not None:  # specs validated by then
                refusals.append(f"--context-parallel: mechanism {mechanism!r} has its own layer (not a functional op)")
    return refusals


def _canonical_specs(mechanisms: Sequence[str]) -> list[str]:
    """Each spec in its one written form, so that a run typed another way resumes the same records."""
    try:
        return [str(model_spec(m)) for m in mechanisms]
    except (KeyError, TypeError, ValueError) as error:
        raise QualityError(error.args[0]) from None


def check_steps(steps: int | None) -> None:
    """Refuse a ``steps`` override that is not a positive integer."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise QualityError(f"steps={steps!r} must be a positive integer (training steps per run), e.g. 625")


def plan_jobs(tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]], preset: QualityPreset,
              seeds: int, *, lrs: Sequence[float] | None = None, steps: int | None = None) -> list[Job]:
    """Every (task, config, mechanism, learning rate, seed); ``mechanisms`` may be one list or a list per
    task. The rates are the preset's sweep for each task (:meth:`QualityPreset.sweep`), or ``lrs`` for
    every task; each rate is a separate job whose config carries it. ``steps`` trains every config for
    that many steps instead of its own; a config whose steps it changes is labelled with them
    (``V8192-L64-P8-d64-625steps``), so its rows never mix with the preset's."""
    per_task = mechanisms if isinstance(mechanisms, Mapping) else {t: mechanisms for t in tasks}
    override = None if lrs is None else check_learning_rates(lrs, name="lrs")
    check_steps(steps)
    jobs = []
    for task in tasks:
        for config in preset.tasks[task]:
            sweep = override or preset.sweep(task, config)
            variant = ""
            if steps is not None and steps != config.steps:
                variant = f"{TASKS[task].label(config)}-{steps}steps"
                config = dataclasses.replace(config, steps=steps)
            jobs += [Job(task, mechanism, seed, dataclasses.replace(config, lr=lr), preset.name, sweep, variant)
                     for mechanism in per_task[task] for lr in sweep for seed in range(seeds)]
    return jobs


def pending_jobs(jobs: Sequence[Job], results_path: Path) -> list[Job]:
    """The jobs without a successful record in ``results_path`` (a failed run is not complete)."""
    done = completed_keys([r for r in load_results(results_path) if r.get("status") != "failed"], RESULT_KEY)
    return [j for j in jobs if result_key(j.key_record(), RESULT_KEY) not in done]


def run_quality(*, tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]],
                preset: str | QualityPreset = "quick",
                seeds: int | None = None, out_dir: str | Path, nproc: int = 1, device: str | None = None,
                threads: int | None = 1, progress: bool = True, console: Any = None,
                context_parallel: int = 1, workers: int = 1, ray: str | None = None,
                strict: bool = True, lrs: Sequence[float] | None = None, steps: int | None = None,
                resume_hint: str = "rerun the same command to resume") -> QualityResults:
    """Validate, then train every pending job and append its record to ``out_dir/results.jsonl``.

    ``mechanisms`` is one list for all tasks or a mapping task -> list. Returns the successful records
    of this plan's jobs (already finished ones included, read from the file); ``.failed`` holds those
    whose latest attempt raised. ``strict=True`` raises :class:`QualityError` listing every refused
    (task, mechanism) pair before anything trains; ``strict=False`` prints each refusal with its reason
    to ``console`` and trains the pairs that fit. A plan of 0 runs raises :class:`QualityError`.
    ``threads``: intra-op CPU threads per training process (default 1: these models are small, and on
    a shared CPU more threads spin-wait against each other; ``None`` keeps PyTorch's setting).
    ``workers=N``: runs spread over ``N`` worker processes, this process alone writing the results
    (:func:`attnlab.bench.runner.run_in_workers`). ``ray``: a Ray cluster's address, or ``"local"``
    for a local Ray instance with ``workers`` CPUs (:mod:`attnlab.bench.ray_runner`).
    ``context_parallel=C``: each sequence split over ``C`` ranks (:mod:`attnlab.distributed`),
    ``nproc`` data-parallel replicas of them, ``nproc * C`` processes (torchrun). Ctrl-C raises
    :class:`attnlab.cli_errors.Interrupted` after stopping every worker; the same call resumes.
    ``lrs``: the learning rates to train every task at, instead of the preset's sweeps (:func:`plan_jobs`).
    ``steps``: training steps for every config instead of its own (:func:`plan_jobs`).
    ``mechanisms`` are mechanism specs: registered names, or names with options
    (``linear:feature_map=taylor:feature_dim=16``, :mod:`attnlab.mechanism_spec`).
    ``resume_hint``: how the Ctrl-C message tells the user to carry on.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise QualityError(f"threads={threads!r} must be a positive integer (intra-op threads per run)")
        torch.set_num_threads(threads)
    try:
        return _run_quality(tasks, mechanisms, preset, seeds, out_dir, nproc, device, progress, console,
                            context_parallel, workers=workers, ray=ray, strict=strict, threads=threads or 1,
                            lrs=lrs, steps=steps, resume_hint=resume_hint)
    finally:
        torch.set_num_threads(previous_threads)


def check_device(device: str | None) -> None:
    """Refuse a device this PyTorch build cannot use, before anything trains."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise QualityError(f"device={device!r} is not a device ({error}): use cpu or cuda") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise QualityError(f"device={device!r} but this PyTorch build sees no CUDA device "
                           f"(torch.cuda.is_available() is False): use device cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise QualityError(f"device={device!r}: the quality benchmark runs on cpu or cuda")


def _run_quality(tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]],
                 preset: str | QualityPreset, seeds: int | None, out_dir: str | Path, nproc: int,
                 device: str | None, progress: bool, console: Any, context_parallel: int = 1, *,
                 workers: int = 1, ray: str | None = None, strict: bool = True, threads: int = 1,
                 lrs: Sequence[float] | None = None, steps: int | None = None,
                 resume_hint: str = "rerun the same command to resume",
                 ) -> QualityResults:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    seeds = preset.seeds if seeds is None else seeds
    if seeds < 1:
        raise QualityError(f"seeds={seeds} must be at least 1")
    if nproc < 1:
        raise QualityError(f"nproc={nproc} must be at least 1")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise QualityError(f"workers={workers!r} must be a positive integer (parallel training processes)")
    if workers > 1 and (nproc > 1 or context_parallel > 1):
        raise QualityError(f"workers={workers} with nproc={nproc} / context_parallel={context_parallel}: torchrun "
                           f"already uses the processes for one run at a time; choose one of the two")
    if ray is not None and (nproc > 1 or context_parallel > 1):
        raise QualityError("ray with nproc / context_parallel: a Ray task trains one run in one process; "
                           "choose one of the two")
    check_device(device)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QualityError(f"out_dir {out} is a file, not a folder: choose a folder for the run's results")
    if isinstance(mechanisms, Mapping):
        per_task = {t: _canonical_specs(mechanisms.get(t, [])) for t in tasks}
    else:
        per_task = {t: _canonical_specs(mechanisms) for t in tasks}
    refusals = [r for t in tasks for r in validate([t], per_task[t], preset)]
    if refusals and strict:
        raise QualityError("refused before training: " + "; ".join(map(str, refusals)))
    for refusal in refusals:
        if console is not None:
            console.print(f"skipped {refusal}")
        per_task[refusal.task] = [m for m in per_task[refusal.task] if m != refusal.mechanism]
    parallel_refusals = _context_parallel_refusals(tasks, per_task, preset, context_parallel)
    if parallel_refusals:
        raise QualityError("refused before training: " + "; ".join(parallel_refusals))
    jobs = plan_jobs(tasks, per_task, preset, seeds, lrs=lrs, steps=steps)
    if not jobs:
        why = (f"every (task, mechanism) pair was refused ({len(refusals)})" if refusals
               else "no task or no mechanism was given")
        raise NothingToRun(f"nothing to run: the plan has 0 runs ({why}); give at least one mechanism that fits "
                           f"each task")
    results_path = out / "results.jsonl"
    # one writer per folder: a second run on the same --out is refused while this one reads and appends
    with exclusive_writer(out):
        todo = pending_jobs(jobs, results_path)
        if console is not None:
            console.print(f"{len(jobs)} runs in plan, {len(jobs) - len(todo)} already in {results_path}, "
                          f"{len(todo)} to train")
        recorder = Recorder(results_path, planned=len(jobs), done_before=len(jobs) - len(todo),
                            resume_hint=resume_hint)
        if todo:
            if nproc > 1 or context_parallel > 1:
                try:
                    launch(todo, out_dir=out, nproc=nproc * context_parallel, device=device,
                           context_parallel=context_parallel)
                except KeyboardInterrupt:  # torchrun's rank 0 appended what finished
                    raise recorder.interrupted() from None
            elif ray is not None:
                from attnlab.bench.ray_runner import run_on_ray

                run_on_ray(todo, address=ray, recorder=recorder, device=device, threads=threads,
                           local_cpus=workers, progress=progress, console=console)
            elif workers > 1 and len(todo) > 1:
                run_in_workers(todo, workers=workers, recorder=recorder, device=device, threads=threads,
                               progress=progress, console=console)
            else:
                execute(todo, results_path=results_path, device=torch.device(device or "cpu"), progress=progress,
                        console=console, recorder=recorder, keep_going=True)
    return _plan_records(jobs, results_path)


def _plan_records(jobs: Sequence[Job], results_path: Path) -> QualityResults:
    """The plan's records in the file: the successful ones, and the keys whose only records failed."""
    wanted = {result_key(j.key_record(), RESULT_KEY) for j in jobs}
    ok: list[dict[str, Any]] = []
    failed: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in load_results(results_path):
        key = result_key(record, RESULT_KEY)
        if key not in wanted:
            continue
        if record.get("status") == "failed":
            failed[key] = record  # the latest failure of that key
        else:
            ok.append(record)
    done = {result_key(r, RESULT_KEY) for r in ok}
    return QualityResults(ok, [r for k, r in failed.items() if k not in done])
