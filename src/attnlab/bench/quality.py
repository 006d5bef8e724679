"""The quality benchmark: train every (task, mechanism, seed, config) and append one JSON line each.

Everything the runner does with a mechanism goes through the registry (``attnlab.mechanisms()`` /
``attnlab.get()``), so mechanisms registered later are picked up without changes here. Before any
training starts, every requested (task, mechanism) pair is checked: unknown names, mechanisms whose
role is not "mixer", non-causal mechanisms for a language model, causal-only ones for an encoder, and
mechanisms whose model cannot be built or run at the task's sizes are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import attnlab
from attnlab.bench.presets import QualityPreset, get_preset
from attnlab.bench.results import append_result, completed_keys, load_results, result_key, versions
from attnlab.models import LanguageModel, SequenceClassifier, VisionTransformer, mixer_refusal
from attnlab.registry import Mechanism
from attnlab.tasks import incontext_regression as icl
from attnlab.tasks.digits import DigitsConfig, load_digits_split
from attnlab.tasks.match import MatchConfig, sample_match
from attnlab.tasks.mqar import IGNORE_INDEX, MQARConfig, multiquery_ar
from attnlab.tasks.needle import NeedleConfig, sample_needle
from attnlab.tasks.wikitext import WikiTextConfig, bits_per_byte, load_wikitext_split, sample_windows

__all__ = ["QualityTask", "TASKS", "Job", "RESULT_KEY", "Refusal", "plan_jobs", "validate", "run_job",
           "run_quality", "QualityError", "config_label", "fitting_mechanisms"]

RESULT_KEY = ("task", "mechanism", "seed", "config")
LOSS_CURVE_POINTS = 60


class QualityError(ValueError):
    """A request the benchmark refuses before training (unknown names, mechanisms that do not fit)."""


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainOutcome:
    metrics: dict[str, float]
    loss_curve: list[list[float]]
    model: nn.Module


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_loop(model: nn.Module, *, steps: int, lr: float, weight_decay: float, batch_size: int, seed: int,
               sample: Callable[[torch.Generator, int], Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
               evaluate: Callable[[nn.Module], dict[str, float]], device: torch.device,
               on_step: Callable[[int], None] | None = None) -> TrainOutcome:
    """AdamW with linear warm-up (5 % of the steps) and a cosine decay to zero; fresh batches each step.

    Under ``torch.distributed`` (``--nproc``) the model is wrapped in DistributedDataParallel, each
    rank draws ``batch_size / world_size`` examples from its own stream and gradients are averaged.
    """
    rank, world = _distributed()
    if batch_size % world != 0:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes {world}")
    torch.manual_seed(seed)
    model = model.to(device)
    trained: nn.Module = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(1_000_003 * (seed + 1) + rank)
    every = max(1, steps // LOSS_CURVE_POINTS)
    curve: list[list[float]] = []
    running, count = 0.0, 0
    model.train()
    for step in range(steps):
        batch = sample(generator, batch_size // world)
        loss = loss_fn(trained, _to(batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += float(loss.detach())
        count += 1
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append([step + 1, running / count])
            running, count = 0.0, 0
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    with torch.no_grad():
        metrics = evaluate(model)
    if curve and not math.isfinite(curve[-1][1]):
        metrics["diverged"] = 1.0
    return TrainOutcome(metrics, curve, model)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple | list):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def _batched(inputs: torch.Tensor, size: int) -> Iterable[slice]:
    for start in range(0, inputs.shape[0], size):
        yield slice(start, start + size)


def _token_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device,
                    chunk: int = 250, *, sparse: bool = False) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the labelled positions (labels != -100).

    ``sparse=True``: the model takes ``select=`` (:class:`attnlab.models.LanguageModel`) and computes
    logits at the labelled positions only.
    """
    correct, total, loss_sum = 0, 0, 0.0
    for part in _batched(inputs, chunk):
        target = labels[part].to(device)
        mask = target != IGNORE_INDEX
        if sparse:
            logits = model(inputs[part].to(device), select=mask).float()  # (K, vocab)
        else:
            logits = model(inputs[part].to(device)).float()[mask]  # (K, vocab)
        correct += int((logits.argmax(-1) == target[mask]).sum())
        total += int(mask.sum())
        loss_sum += float(F.cross_entropy(logits, target[mask], reduction="sum"))
    return correct / max(total, 1), loss_sum / max(total, 1)


def _lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, labels = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def _answer_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy at the labelled positions, the read-out computed there only (``select=``).

    The same loss as :func:`_lm_loss` for labels that are -100 almost everywhere (MQAR: 8 answers in
    64 positions), without the ``[B, N, vocab]`` logits: an MQAR step at vocabulary 8192 is several
    times cheaper.
    """
    inputs, labels = batch
    mask = labels != IGNORE_INDEX
    return F.cross_entropy(model(inputs, select=mask).float(), labels[mask])


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class QualityTask:
    """How the benchmark trains and scores one task.

    Attributes:
        name: the task name users pass to ``--tasks``.
        metric: the headline metric recorded as ``value``; ``higher_is_better`` orders the leaderboard.
        masking: "causal" (a decoder), "bidirectional" (an encoder) or "any" (causal when the
            mechanism defines it, else bidirectional: the read-out position sees the whole prompt either way).
        config_type: the typed config of the task.
        build: ``(config, mechanism, causal) -> model``.
        probe: ``(config) -> a tiny batch of inputs`` to check that a mechanism runs at the task's sizes.
        run: ``(config, model, seed, device, on_step) -> TrainOutcome``.
        label: ``(config) -> short variant label`` for tables.
    """

    name: str
    metric: str
    higher_is_better: bool
    masking: str
    config_type: type
    build: Callable[[Any, str, bool], nn.Module]
    probe: Callable[[Any], torch.Tensor]
    run: Callable[..., TrainOutcome]
    label: Callable[[Any], str]
    description: str = ""

    def causal_for(self, record: Mechanism) -> bool:
        if self.masking == "causal":
            return True
        if self.masking == "bidirectional":
            return False
        return record.supports_causal

    def refusal(self, record: Mechanism) -> str | None:
        """Why ``record`` cannot run this task (by its metadata alone), or ``None``."""
        if self.masking == "any":
            if record.role != "mixer":
                return mixer_refusal(record, causal=record.supports_causal)
            return None
        reason = mixer_refusal(record, causal=self.masking == "causal")
        if reason is not None:
            return f"{reason} [task {self.name!r}]"
        return None


def _mqar_run(config: MQARConfig, model: nn.Module, seed: int, device: torch.device,
              on_step: Callable[[int], None] | None) -> TrainOutcome:
    def sample(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return multiquery_ar(n, vocab_size=config.vocab_size, seq_len=config.seq_len, num_pairs=config.num_pairs,
                             power_a=config.power_a, generator=generator)

    test = sample(torch.Generator().manual_seed(7_777 + seed), config.test_examples)

    def evaluate(m: nn.Module) -> dict[str, float]:
        accuracy, loss = _token_accuracy(m, *test, device, sparse=True)
        return {"accuracy": accuracy, "test_loss": loss}

    return train_loop(model, steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                      batch_size=config.batch_size, seed=seed, sample=sample, loss_fn=_answer_loss, evaluate=evaluate,
                      device=device, on_step=on_step)


def _needle_run(config: NeedleConfig, model: nn.Module, seed: int, device: torch.device,
                on_step: Callable[[int], None] | None) -> TrainOutcome:
    def sample(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels, _ = sample_needle(n, vocab_size=config.vocab_size, length=config.length, generator=generator)
        return inputs, labels

    test = sample(torch.Generator().manual_seed(7_777 + seed), config.test_examples)

    def evaluate(m: nn.Module) -> dict[str, float]:
        accuracy, loss = _token_accuracy(m, *test, device, sparse=True)
        return {"accuracy": accuracy, "test_loss": loss}

    return train_loop(model, steps=config.steps, lr=config.lr, weight_decay=0.1, batch_size=config.batch_size,
                      seed=seed, sample=sample, loss_fn=_answer_loss, evaluate=evaluate, device=device, on_step=on_step)


def _match_run(config: MatchConfig, model: nn.Module, seed: int, device: torch.device,
               on_step: Callable[[int], None] | None) -> TrainOutcome:
    def sample(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_match(n, length=config.length, modulus=config.modulus, order=config.order, generator=generator)

    test = sample(torch.Generator().manual_seed(7_777 + seed), config.test_examples)

    def evaluate(m: nn.Module) -> dict[str, float]:
        accuracy, loss = _token_accuracy(m, *test, device)
        return {"accuracy": accuracy, "test_loss": loss, "positive_rate": float(test[1].float().mean())}

    return train_loop(model, steps=config.steps, lr=config.lr, weight_decay=0.01, batch_size=config.batch_size,
                      seed=seed, sample=sample, loss_fn=_lm_loss, evaluate=evaluate, device=device, on_step=on_step)


@lru_cache(maxsize=8)
def _icl_baselines(config: icl.ICLRegressionConfig, seed: int) -> dict[str, float]:
    return icl.baseline_losses(config, seed=seed)


def _icl_run(config: icl.ICLRegressionConfig, model: nn.Module, seed: int, device: torch.device,
             on_step: Callable[[int], None] | None) -> TrainOutcome:
    def sample(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = icl.sample_linear_regression(n, dim=config.dim, length=config.length,
                                             noise_variance=config.noise_variance, beta_scale=config.beta_scale,
                                             generator=generator)
        return batch.tokens, batch.target

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, target = batch
        return F.mse_loss(m(tokens)[:, 0].float(), target)

    test = icl.evaluation_set(config, seed=seed)

    def evaluate(m: nn.Module) -> dict[str, float]:
        errors = []
        for part in _batched(test.tokens, 1000):
            errors.append((m(test.tokens[part].to(device))[:, 0].float().cpu() - test.target[part]) ** 2)
        mse = float(torch.cat(errors).mean())
        baselines = _icl_baselines(config, seed)
        return {"mse": mse, **{f"baseline_{k}": v for k, v in baselines.items()},
                "ratio_to_debiased_gd": mse / baselines["debiased_gd_one_step"],
                "ratio_to_ridge": mse / baselines["ridge"]}

    return train_loop(model, steps=config.steps, lr=config.lr, weight_decay=0.0, batch_size=config.batch_size,
                      seed=seed, sample=sample, loss_fn=loss_fn, evaluate=evaluate, device=device, on_step=on_step)


@lru_cache(maxsize=4)
def _digits(seed: int, test_fraction: float) -> Any:
    return load_digits_split(seed=seed, test_fraction=test_fraction)


def _digits_run(config: DigitsConfig, model: nn.Module, seed: int, device: torch.device,
                on_step: Callable[[int], None] | None) -> TrainOutcome:
    split = _digits(seed, config.test_fraction)

    def sample(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(split.train_labels), (n,), generator=generator)
        return split.train_images[index], split.train_labels[index]

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(m(images).float(), labels)

    def evaluate(m: nn.Module) -> dict[str, float]:
        logits = m(split.test_images.to(device)).float().cpu()
        return {"accuracy": float((logits.argmax(-1) == split.test_labels).float().mean()),
                "test_loss": float(F.cross_entropy(logits, split.test_labels))}

    return train_loop(model, steps=config.steps, lr=config.lr, weight_decay=0.05, batch_size=config.batch_size,
                      seed=seed, sample=sample, loss_fn=loss_fn, evaluate=evaluate, device=device, on_step=on_step)


@lru_cache(maxsize=2)
def _wikitext(validation_fraction: float) -> Any:
    return load_wikitext_split(seed=0, validation_fraction=validation_fraction)


def _wikitext_run(config: WikiTextConfig, model: nn.Module, seed: int, device: torch.device,
                  on_step: Callable[[int], None] | None) -> TrainOutcome:
    split = _wikitext(config.validation_fraction)

    def sample(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_windows(split.train, batch_size=n, length=config.length, generator=generator)

    validation = sample_windows(split.validation, batch_size=config.validation_windows, length=config.length,
                                generator=torch.Generator().manual_seed(7_777))

    def evaluate(m: nn.Module) -> dict[str, float]:
        _, loss = _token_accuracy(m, *validation, device, chunk=50)
        return {"bits_per_byte": bits_per_byte(loss), "validation_loss": loss}

    return train_loop(model, steps=config.steps, lr=config.lr, weight_decay=0.1, batch_size=config.batch_size,
                      seed=seed, sample=sample, loss_fn=_lm_loss, evaluate=evaluate, device=device, on_step=on_step)


def _icl_model(config: icl.ICLRegressionConfig, mechanism: str, causal: bool) -> nn.Module:
    # One attention layer, no MLP, no norms, no positions: the model of the paper (spec A8.2), with
    # head dim d + 1 per head; it reads the prediction at the query token (the last one).
    token_dim = config.dim + 1
    return SequenceClassifier(1, config.heads * token_dim, 1, config.heads, mechanism=mechanism,
                              max_len=config.length + 1, input_dim=token_dim, pooling="last", causal=causal,
                              mlp_ratio=0, norm=False, positions=False)


def _match_task(name: str, description: str) -> QualityTask:
    """The match2 / match3 detection task: an encoder with per-token labels (they differ in their config)."""
    return QualityTask(
        name=name, metric="accuracy", higher_is_better=True, masking="bidirectional", config_type=MatchConfig,
        build=lambda c, m, causal: SequenceClassifier(2, c.dim, c.depth, c.heads, mechanism=m, max_len=c.length,
                                                      vocab_size=c.modulus, pooling="none"),
        probe=lambda c: torch.randint(c.modulus, (2, c.length)),
        run=_match_run, label=lambda c: f"L{c.length}-M{c.modulus}-d{c.dim}",
        description=description)


TASKS: dict[str, QualityTask] = {task.name: task for task in (
    QualityTask(
        name="mqar", metric="accuracy", higher_is_better=True, masking="causal", config_type=MQARConfig,
        build=lambda c, m, causal: LanguageModel(c.vocab_size, c.dim, c.depth, c.heads, mechanism=m,
                                                 max_len=c.seq_len, init_std=c.init_std,
                                                 tie_embeddings=c.tie_embeddings),
        probe=lambda c: torch.randint(c.vocab_size, (2, c.seq_len)),
        run=_mqar_run, label=lambda c: f"V{c.vocab_size}-L{c.seq_len}-P{c.num_pairs}-d{c.dim}",
        description="multi-query associative recall (zoology), decoder LM"),
    QualityTask(
        name="incontext_regression", metric="mse", higher_is_better=False, masking="any",
        config_type=icl.ICLRegressionConfig, build=_icl_model,
        probe=lambda c: torch.randn(2, c.length + 1, c.dim + 1),
        run=_icl_run, label=lambda c: f"d{c.dim}-L{c.length}-H{c.heads}",
        description="in-context linear regression, one attention layer (test MSE; ridge and one-step GD baselines)"),
    _match_task("match3", "Match3 triple detection, encoder (per-token accuracy)"),
    _match_task("match2", "Match2 pair detection, encoder (per-token accuracy)"),
    QualityTask(
        name="needle", metric="accuracy", higher_is_better=True, masking="causal", config_type=NeedleConfig,
        build=lambda c, m, causal: LanguageModel(c.vocab_size, c.dim, c.depth, c.heads, mechanism=m,
                                                 max_len=c.length),
        probe=lambda c: torch.randint(c.vocab_size, (2, c.length)),
        run=_needle_run, label=lambda c: f"V{c.vocab_size}-L{c.length}-d{c.dim}",
        description="synthetic needle-in-a-haystack retrieval, decoder LM"),
    QualityTask(
        name="digits", metric="accuracy", higher_is_better=True, masking="bidirectional", config_type=DigitsConfig,
        build=lambda c, m, causal: VisionTransformer(8, c.patch_size, 1, 10, dim=c.dim, depth=c.depth,
                                                     heads=c.heads, mechanism=m),
        probe=lambda c: torch.rand(2, 1, 8, 8),
        run=_digits_run, label=lambda c: f"p{c.patch_size}-d{c.dim}-depth{c.depth}",
        description="scikit-learn 8x8 digits, vision transformer (test accuracy)"),
    QualityTask(
        name="wikitext", metric="bits_per_byte", higher_is_better=False, masking="causal",
        config_type=WikiTextConfig,
        build=lambda c, m, causal: LanguageModel(256, c.dim, c.depth, c.heads, mechanism=m, max_len=c.length),
        probe=lambda c: torch.randint(256, (2, c.length)),
        run=_wikitext_run, label=lambda c: f"L{c.length}-d{c.dim}-depth{c.depth}",
        description="byte-level Wikipedia (gensim's dump), decoder LM (validation bits per byte)"),
)}


def config_label(task: str, config: Any) -> str:
    return TASKS[task].label(config)


# --------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Job:
    """One training run: what is recorded and what resume compares."""

    task: str
    mechanism: str
    seed: int
    config: Any
    preset: str

    @property
    def label(self) -> str:
        return config_label(self.task, self.config)

    def key_record(self) -> dict[str, Any]:
        return {"task": self.task, "mechanism": self.mechanism, "seed": self.seed,
                "config": dataclasses.asdict(self.config)}

    def to_json(self) -> dict[str, Any]:
        return {**self.key_record(), "preset": self.preset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        task = TASKS[data["task"]]
        return cls(data["task"], data["mechanism"], int(data["seed"]), task.config_type(**data["config"]),
                   data["preset"])


@dataclass(frozen=True)
class Refusal:
    task: str
    mechanism: str
    reason: str

    def __str__(self) -> str:
        return f"{self.mechanism} on {self.task}: {self.reason}"


def _probe(task: QualityTask, config: Any, record: Mechanism) -> str | None:
    """Build the task's model with this mechanism and run one tiny forward/backward; the error, or None."""
    try:
        torch.manual_seed(0)
        model = task.build(config, record.name, task.causal_for(record))
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

    Unknown task or mechanism names raise :class:`QualityError` right away.
    """
    unknown_tasks = [t for t in tasks if t not in TASKS]
    if unknown_tasks:
        raise QualityError(f"unknown task(s) {', '.join(map(repr, unknown_tasks))} (tasks: {', '.join(TASKS)})")
    missing = [t for t in tasks if t not in preset.tasks]
    if missing:
        raise QualityError(f"preset {preset.name!r} has no config for task(s) {', '.join(missing)}")
    records = []
    for name in mechanisms:
        try:
            records.append(attnlab.get(name))
        except (KeyError, TypeError) as error:
            raise QualityError(error.args[0]) from None
    refusals = []
    for task_name in tasks:
        task = TASKS[task_name]
        for record in records:
            reason = task.refusal(record)
            if reason is None and probe:
                for config in preset.tasks[task_name]:
                    reason = _probe(task, config, record)
                    if reason is not None:
                        break
            if reason is not None:
                refusals.append(Refusal(task_name, record.name, reason))
    return refusals


def fitting_mechanisms(task: str, preset: QualityPreset, candidates: Sequence[str] | None = None) -> list[str]:
    """The registered mechanisms (or ``candidates``) that can run ``task`` under ``preset``."""
    names = [m.name for m in attnlab.mechanisms()] if candidates is None else list(candidates)
    refused = {r.mechanism for r in validate([task], names, preset)}
    return [n for n in names if n not in refused]


def plan_jobs(tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]], preset: QualityPreset,
              seeds: int) -> list[Job]:
    """Every (task, config, mechanism, seed); ``mechanisms`` may be one list or a list per task."""
    per_task = mechanisms if isinstance(mechanisms, Mapping) else {t: mechanisms for t in tasks}
    return [Job(task, mechanism, seed, config, preset.name)
            for task in tasks for config in preset.tasks[task] for mechanism in per_task[task]
            for seed in range(seeds)]


# --------------------------------------------------------------------------------------------- running


def run_job(job: Job, *, device: torch.device | None = None,
            on_step: Callable[[int], None] | None = None) -> tuple[dict[str, Any], nn.Module]:
    """Train and score one job; the JSON record (without writing it) and the trained model."""
    device = device or torch.device("cpu")
    task = TASKS[job.task]
    record = attnlab.get(job.mechanism)
    torch.manual_seed(job.seed)
    model = task.build(job.config, job.mechanism, task.causal_for(record))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trunk = getattr(model, "trunk", None)
    options = {k: v if isinstance(v, int | float | str | bool) or v is None else repr(v)
               for k, v in getattr(trunk, "mixer_options", {}).items()}
    state_size = getattr(model, "state_size", None)
    start = time.perf_counter()
    outcome = task.run(job.config, model, job.seed, device, on_step)
    wall = time.perf_counter() - start
    _, world = _distributed()
    result = {
        **job.to_json(),
        "config_label": job.label,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "value": outcome.metrics[task.metric],
        "metrics": outcome.metrics,
        "loss_curve": outcome.loss_curve,
        "parameters": parameters,
        "state_size": state_size,
        "family": record.family,
        "mixer_options": options,
        "causal": task.causal_for(record),
        "steps": job.config.steps,
        "wall_time_s": round(wall, 3),
        "world_size": world,
        "device": str(device),
        "versions": versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result, outcome.model


def pending_jobs(jobs: Sequence[Job], results_path: Path) -> list[Job]:
    done = completed_keys(load_results(results_path), RESULT_KEY)
    return [j for j in jobs if result_key(j.key_record(), RESULT_KEY) not in done]


def run_quality(*, tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]],
                preset: str | QualityPreset = "quick",
                seeds: int | None = None, out_dir: str | Path, nproc: int = 1, device: str | None = None,
                threads: int | None = 1, progress: bool = True, console: Any = None) -> list[dict[str, Any]]:
    """Validate, then train every pending job and append its record to ``out_dir/results.jsonl``.

    ``mechanisms`` is one list for all tasks or a mapping task -> list. Returns the records of this
    run's jobs (already finished ones included, read from the file). Raises :class:`QualityError`
    listing every refusal before anything trains. ``threads``: intra-op CPU threads (default 1: these
    models are small, and on a shared CPU more threads spin-wait against each other; ``None`` keeps
    PyTorch's setting).
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_quality(tasks, mechanisms, preset, seeds, out_dir, nproc, device, progress, console)
    finally:
        torch.set_num_threads(previous_threads)


def _run_quality(tasks: Sequence[str], mechanisms: Sequence[str] | Mapping[str, Sequence[str]],
                 preset: str | QualityPreset, seeds: int | None, out_dir: str | Path, nproc: int,
                 device: str | None, progress: bool, console: Any) -> list[dict[str, Any]]:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    seeds = preset.seeds if seeds is None else seeds
    if seeds < 1:
        raise QualityError(f"seeds={seeds} must be at least 1")
    if nproc < 1:
        raise QualityError(f"nproc={nproc} must be at least 1")
    per_task = mechanisms if isinstance(mechanisms, Mapping) else {t: list(mechanisms) for t in tasks}
    refusals = [r for t in tasks for r in validate([t], per_task.get(t, []), preset)]
    if refusals:
        raise QualityError("refused before training:\n" + "\n".join(f"  - {r}" for r in refusals))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    jobs = plan_jobs(tasks, per_task, preset, seeds)
    todo = pending_jobs(jobs, results_path)
    if console is not None:
        console.print(f"{len(jobs)} runs in plan, {len(jobs) - len(todo)} already in {results_path}, "
                      f"{len(todo)} to train")
    if todo:
        if nproc > 1:
            from attnlab.bench.ddp import launch

            launch(todo, out_dir=out, nproc=nproc, device=device)
        else:
            execute(todo, results_path=results_path, device=torch.device(device or "cpu"), progress=progress,
                    console=console)
    wanted = {result_key(j.key_record(), RESULT_KEY) for j in jobs}
    return [r for r in load_results(results_path) if result_key(r, RESULT_KEY) in wanted]


def execute(jobs: Sequence[Job], *, results_path: Path, device: torch.device, progress: bool = True,
            console: Any = None, write: bool = True, after_job: Callable[[Job, nn.Module], None] | None = None) -> None:
    """Train ``jobs`` one after the other, appending each record as it finishes (rank 0 only writes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        overall = bar.add_task("all runs", total=len(jobs))
        for job in jobs:
            current = bar.add_task(f"{job.task} {job.label} {job.mechanism} seed {job.seed}",
                                   total=job.config.steps)
            result, model = run_job(job, device=device, on_step=lambda step, t=current: bar.update(t, completed=step))
            if write:
                append_result(results_path, result)
            if after_job is not None:
                after_job(job, model)
            bar.update(current, description=f"{job.task} {job.label} {job.mechanism} seed {job.seed}: "
                                            f"{result['metric']}={result['value']:.4g}")
            bar.update(overall, advance=1)
