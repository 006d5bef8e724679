"""The tasks of the quality benchmark: how each builds its model, draws batches, trains and is scored.

A :class:`QualityTask` is data: a model builder, a :class:`TaskData` factory (the training sampler,
the test evaluation and the validation evaluation), a loss and an AdamW weight decay.
:meth:`QualityTask.train` is the one run function every task shares
(:func:`attnlab.bench.training.train_loop` with the task's parts).

Three disjoint sources of data per seed ``s``, none depending on the mechanism or the learning rate
(so runs that differ only in those see the same examples): the training batches (a generator seeded
from ``s`` in the training loop), the test set and the validation set. The synthetic tasks (MQAR,
needle, match, in-context regression) draw test and validation sets from two other generator
streams (``TEST_SEED + s`` and ``VALIDATION_SEED + s``); digits and Wikipedia hold the validation
images / articles out of the training data, apart from the test ones. A learning rate is chosen on
the validation metrics, and the test metrics are reported at that rate (zoology's protocol, "Zoology:
Measuring and Improving Recall in Efficient Language Models", arXiv 2312.04927, sweeps the rate per mixer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.bench.training import TrainOutcome, train_loop
from attnlab.models import LanguageModel, SequenceClassifier, VisionTransformer, mixer_refusal
from attnlab.registry import Mechanism
from attnlab.tasks import incontext_regression as icl
from attnlab.tasks.digits import DigitsConfig, load_digits_split
from attnlab.tasks.match import MatchConfig, sample_match
from attnlab.tasks.mqar import IGNORE_INDEX, MQARConfig, multiquery_ar
from attnlab.tasks.needle import NeedleConfig, sample_needle
from attnlab.tasks.wikitext import WikiTextConfig, bits_per_byte, load_wikitext_split, sample_windows

__all__ = ["QualityTask", "TaskData", "TASKS", "config_label", "lm_loss", "answer_loss", "token_accuracy"]

Batch = tuple[torch.Tensor, torch.Tensor]
TEST_SEED = 7_777  # the held-out set of seed s is drawn with generator seed TEST_SEED + s
# the validation set of seed s: generator seed VALIDATION_SEED + s, far from the test seeds above, the
# in-context regression seeds (10_000 + s, 20_000 + s) and the training streams (1_000_003 (s + 1) + rank)
VALIDATION_SEED = 2**40


@dataclass(frozen=True)
class TaskData:
    """A task's data for one seed: ``sample(generator, n)`` draws a training batch of ``n`` examples,
    ``evaluate(model)`` scores the trained model on the test set, ``validate(model)`` on the validation
    set (the task's metric under the same name; disjoint from the test set and the training data).
    ``test_set`` and ``validation_set`` are the held-out examples themselves, as the scorers read them."""

    sample: Callable[[torch.Generator, int], Any]
    evaluate: Callable[[nn.Module], dict[str, float]]
    validate: Callable[[nn.Module], dict[str, float]]
    test_set: Any = None
    validation_set: Any = None


# ---------------------------------------------------------------------------------------- losses, scores


def _batched(inputs: torch.Tensor, size: int) -> Iterable[slice]:
    for start in range(0, inputs.shape[0], size):
        yield slice(start, start + size)


def token_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device,
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


def lm_loss(model: nn.Module, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits ``[B, N, vocab]`` at every labelled position (``reduction="sum"``: summed,
    as a shard of a context-parallel batch needs)."""
    inputs, labels = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def answer_loss(model: nn.Module, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy at the labelled positions, the read-out computed there only (``select=``).

    The same loss as :func:`lm_loss` for labels that are -100 almost everywhere (MQAR: 8 answers in
    64 positions), without the ``[B, N, vocab]`` logits: an MQAR step at vocabulary 8192 is several
    times cheaper.
    """
    inputs, labels = batch
    mask = labels != IGNORE_INDEX
    return F.cross_entropy(model(inputs, select=mask).float(), labels[mask], reduction=reduction)


def _regression_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    tokens, target = batch
    return F.mse_loss(model(tokens)[:, 0].float(), target)


def _classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images).float(), labels)


# ---------------------------------------------------------------------------------------- data per task


def _labelled_tokens(sample: Callable[[torch.Generator, int], Batch], test_examples: int, seed: int,
                     device: torch.device, *, sparse: bool, positive_rate: bool = False) -> TaskData:
    """Token sequences with labels at some positions: accuracy and loss there on the test set, and on a
    validation set of the same size drawn from another stream."""
    test = sample(torch.Generator().manual_seed(TEST_SEED + seed), test_examples)
    validation = sample(torch.Generator().manual_seed(VALIDATION_SEED + seed), test_examples)

    def scorer(data: Batch, prefix: str) -> Callable[[nn.Module], dict[str, float]]:
        def score(m: nn.Module) -> dict[str, float]:
            accuracy, loss = token_accuracy(m, *data, device, sparse=sparse)
            scores = {"accuracy": accuracy, f"{prefix}_loss": loss}
            if positive_rate:
                scores["positive_rate"] = float(data[1].float().mean())
            return scores

        return score

    return TaskData(sample, scorer(test, "test"), scorer(validation, "validation"), test, validation)


def _mqar_data(config: MQARConfig, seed: int, device: torch.device) -> TaskData:
    def sample(generator: torch.Generator, n: int) -> Batch:
        return multiquery_ar(n, vocab_size=config.vocab_size, seq_len=config.seq_len, num_pairs=config.num_pairs,
                             power_a=config.power_a, generator=generator)

    return _labelled_tokens(sample, config.test_examples, seed, device, sparse=True)


def _needle_data(config: NeedleConfig, seed: int, device: torch.device) -> TaskData:
    def sample(generator: torch.Generator, n: int) -> Batch:
        inputs, labels, _ = sample_needle(n, vocab_size=config.vocab_size, length=config.length, generator=generator)
        return inputs, labels

    return _labelled_tokens(sample, config.test_examples, seed, device, sparse=True)


def _match_data(config: MatchConfig, seed: int, device: torch.device) -> TaskData:
    def sample(generator: torch.Generator, n: int) -> Batch:
        return sample_match(n, length=config.length, modulus=config.modulus, order=config.order, generator=generator)

    return _labelled_tokens(sample, config.test_examples, seed, device, sparse=False, positive_rate=True)


@lru_cache(maxsize=8)
def _icl_baselines(config: icl.ICLRegressionConfig, seed: int) -> dict[str, float]:
    return icl.baseline_losses(config, seed=seed)


def _icl_data(config: icl.ICLRegressionConfig, seed: int, device: torch.device) -> TaskData:
    def sample(generator: torch.Generator, n: int) -> Batch:
        batch = icl.sample_linear_regression(n, dim=config.dim, length=config.length,
                                             noise_variance=config.noise_variance, beta_scale=config.beta_scale,
                                             generator=generator)
        return batch.tokens, batch.target

    test = icl.evaluation_set(config, seed=seed)
    validation = icl.sample_linear_regression(config.test_examples, dim=config.dim, length=config.length,
                                              noise_variance=config.noise_variance, beta_scale=config.beta_scale,
                                              generator=torch.Generator().manual_seed(VALIDATION_SEED + seed))

    def mse(m: nn.Module, data: icl.ICLBatch) -> float:
        errors = []
        for part in _batched(data.tokens, 1000):
            errors.append((m(data.tokens[part].to(device))[:, 0].float().cpu() - data.target[part]) ** 2)
        return float(torch.cat(errors).mean())

    def evaluate(m: nn.Module) -> dict[str, float]:
        error = mse(m, test)
        baselines = _icl_baselines(config, seed)  # on the test prompts
        return {"mse": error, **{f"baseline_{k}": v for k, v in baselines.items()},
                "ratio_to_debiased_gd": error / baselines["debiased_gd_one_step"],
                "ratio_to_ridge": error / baselines["ridge"]}

    return TaskData(sample, evaluate, lambda m: {"mse": mse(m, validation)}, test, validation)


@lru_cache(maxsize=4)
def _digits(seed: int, test_fraction: float, validation_fraction: float) -> Any:
    return load_digits_split(seed=seed, test_fraction=test_fraction, validation_fraction=validation_fraction)


def _digits_data(config: DigitsConfig, seed: int, device: torch.device) -> TaskData:
    split = _digits(seed, config.test_fraction, config.validation_fraction)

    def sample(generator: torch.Generator, n: int) -> Batch:
        index = torch.randint(len(split.train_labels), (n,), generator=generator)
        return split.train_images[index], split.train_labels[index]

    def scorer(images: torch.Tensor, labels: torch.Tensor, prefix: str) -> Callable[[nn.Module], dict[str, float]]:
        def score(m: nn.Module) -> dict[str, float]:
            logits = m(images.to(device)).float().cpu()  # (n, 10)
            return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
                    f"{prefix}_loss": float(F.cross_entropy(logits, labels))}

        return score

    return TaskData(sample, scorer(split.test_images, split.test_labels, "test"),
                    scorer(split.validation_images, split.validation_labels, "validation"),
                    (split.test_images, split.test_labels), (split.validation_images, split.validation_labels))


@lru_cache(maxsize=2)
def _wikitext(test_fraction: float, validation_fraction: float) -> Any:
    return load_wikitext_split(seed=0, test_fraction=test_fraction, validation_fraction=validation_fraction)


def _wikitext_data(config: WikiTextConfig, seed: int, device: torch.device) -> TaskData:
    split = _wikitext(config.test_fraction, config.validation_fraction)

    def sample(generator: torch.Generator, n: int) -> Batch:
        return sample_windows(split.train, batch_size=n, length=config.length, generator=generator)

    # one test and one validation set for every seed: bits per byte of different seeds compare on the same text
    test = sample_windows(split.test, batch_size=config.test_windows, length=config.length,
                          generator=torch.Generator().manual_seed(TEST_SEED))
    validation = sample_windows(split.validation, batch_size=config.validation_windows, length=config.length,
                                generator=torch.Generator().manual_seed(VALIDATION_SEED))

    def scorer(windows: Batch, prefix: str) -> Callable[[nn.Module], dict[str, float]]:
        def score(m: nn.Module) -> dict[str, float]:
            _, loss = token_accuracy(m, *windows, device, chunk=50)
            return {"bits_per_byte": bits_per_byte(loss), f"{prefix}_loss": loss}

        return score

    return TaskData(sample, scorer(test, "test"), scorer(validation, "validation"), test, validation)


# ---------------------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class QualityTask:
    """How the benchmark trains and scores one task.

    Attributes:
        name: the task name users pass to ``--tasks``.
        metric: the headline metric recorded as ``value``; ``higher_is_better`` orders the leaderboard.
        masking: "causal" (a decoder), "bidirectional" (an encoder) or "any" (causal when the
            mechanism defines it, else bidirectional: the read-out position sees the whole prompt either way).
        config_type: the typed config of the task.
        build: ``(config, mechanism, causal, **options) -> model``; ``options`` go to every mixer
            (:mod:`attnlab.mechanism_spec`).
        probe: ``(config) -> a tiny batch of inputs`` to check that a mechanism runs at the task's sizes.
        data: ``(config, seed, device) -> TaskData``: the training sampler and the evaluation.
        loss: ``(model, batch) -> scalar`` minimised by training.
        weight_decay: AdamW's weight decay, unless the config carries its own ``weight_decay``.
        label: ``(config) -> short variant label`` for tables.
    """

    name: str
    metric: str
    higher_is_better: bool
    masking: str
    config_type: type
    build: Callable[..., nn.Module]
    probe: Callable[[Any], torch.Tensor]
    data: Callable[[Any, int, torch.device], TaskData]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    weight_decay: float
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

    def train(self, config: Any, model: nn.Module, seed: int, device: torch.device,
              on_step: Callable[[int], None] | None = None, context_parallel: int = 1) -> TrainOutcome:
        """Train ``model`` on this task with ``config``'s steps, learning rate and batch size; score it on
        the test and the validation sets (``context_parallel``: ranks that split each sequence, decoder
        tasks only)."""
        data = self.data(config, seed, device)
        return train_loop(model, steps=config.steps, lr=config.lr,
                          weight_decay=getattr(config, "weight_decay", self.weight_decay),
                          batch_size=config.batch_size, seed=seed, sample=data.sample, loss_fn=self.loss,
                          evaluate=data.evaluate, validate=data.validate, device=device, on_step=on_step,
                          context_parallel=context_parallel)


def _icl_model(config: icl.ICLRegressionConfig, mechanism: str, causal: bool, **options: Any) -> nn.Module:
    # One attention layer, no MLP, no norms, no positions: the model of He et al. (arXiv 2503.12734),
    # with head dim d + 1 per head; it reads the prediction at the query token (the last one).
    token_dim = config.dim + 1
    return SequenceClassifier(1, config.heads * token_dim, 1, config.heads, mechanism=mechanism,
                              max_len=config.length + 1, input_dim=token_dim, pooling="last", causal=causal,
                              mlp_ratio=0, norm=False, positions=False, **options)


def _match_task(name: str, description: str) -> QualityTask:
    """The match2 / match3 detection task: an encoder with per-token labels (they differ in their config)."""
    return QualityTask(
        name=name, metric="accuracy", higher_is_better=True, masking="bidirectional", config_type=MatchConfig,
        build=lambda c, m, causal, **o: SequenceClassifier(2, c.dim, c.depth, c.heads, mechanism=m, max_len=c.length,
                                                           vocab_size=c.modulus, pooling="none", **o),
        probe=lambda c: torch.randint(c.modulus, (2, c.length)),
        data=_match_data, loss=lm_loss, weight_decay=0.01, label=lambda c: f"L{c.length}-M{c.modulus}-d{c.dim}",
        description=description)


TASKS: dict[str, QualityTask] = {task.name: task for task in (
    QualityTask(
        name="mqar", metric="accuracy", higher_is_better=True, masking="causal", config_type=MQARConfig,
        build=lambda c, m, causal, **o: LanguageModel(c.vocab_size, c.dim, c.depth, c.heads, mechanism=m,
                                                      max_len=c.seq_len, init_std=c.init_std,
                                                      tie_embeddings=c.tie_embeddings, short_conv=c.short_conv,
                                                      short_conv_layers=c.short_conv_layers, **o),
        probe=lambda c: torch.randint(c.vocab_size, (2, c.seq_len)),
        data=_mqar_data, loss=answer_loss, weight_decay=0.1,  # MQARConfig carries its own weight_decay
        label=lambda c: f"V{c.vocab_size}-L{c.seq_len}-P{c.num_pairs}-d{c.dim}"
                        + (f"-conv{c.short_conv}-{c.short_conv_layers}" if c.short_conv else ""),
        description="multi-query associative recall (zoology), decoder LM"),
    QualityTask(
        name="incontext_regression", metric="mse", higher_is_better=False, masking="any",
        config_type=icl.ICLRegressionConfig, build=_icl_model,
        probe=lambda c: torch.randn(2, c.length + 1, c.dim + 1),
        data=_icl_data, loss=_regression_loss, weight_decay=0.0, label=lambda c: f"d{c.dim}-L{c.length}-H{c.heads}",
        description="in-context linear regression, one attention layer (test MSE; ridge and one-step GD baselines)"),
    _match_task("match3", "Match3 triple detection, encoder (per-token accuracy)"),
    _match_task("match2", "Match2 pair detection, encoder (per-token accuracy)"),
    QualityTask(
        name="needle", metric="accuracy", higher_is_better=True, masking="causal", config_type=NeedleConfig,
        build=lambda c, m, causal, **o: LanguageModel(c.vocab_size, c.dim, c.depth, c.heads, mechanism=m,
                                                      max_len=c.length, **o),
        probe=lambda c: torch.randint(c.vocab_size, (2, c.length)),
        data=_needle_data, loss=answer_loss, weight_decay=0.1,
        label=lambda c: f"V{c.vocab_size}-L{c.length}-d{c.dim}",
        description="synthetic needle-in-a-haystack retrieval, decoder LM"),
    QualityTask(
        name="digits", metric="accuracy", higher_is_better=True, masking="bidirectional", config_type=DigitsConfig,
        build=lambda c, m, causal, **o: VisionTransformer(8, c.patch_size, 1, 10, dim=c.dim, depth=c.depth,
                                                          heads=c.heads, mechanism=m, **o),
        probe=lambda c: torch.rand(2, 1, 8, 8),
        data=_digits_data, loss=_classification_loss, weight_decay=0.05,
        label=lambda c: f"p{c.patch_size}-d{c.dim}-depth{c.depth}",
        description="scikit-learn 8x8 digits, vision transformer (test accuracy)"),
    QualityTask(
        name="wikitext", metric="bits_per_byte", higher_is_better=False, masking="causal",
        config_type=WikiTextConfig,
        build=lambda c, m, causal, **o: LanguageModel(256, c.dim, c.depth, c.heads, mechanism=m, max_len=c.length,
                                                      **o),
        probe=lambda c: torch.randint(256, (2, c.length)),
        data=_wikitext_data, loss=lm_loss, weight_decay=0.1, label=lambda c: f"L{c.length}-d{c.dim}-depth{c.depth}",
        description="byte-level Wikipedia (gensim's dump), decoder LM (test bits per byte)"),
)}


def config_label(task: str, config: Any) -> str:
    """The short label of ``config`` for tables (e.g. ``V128-L32-P4-d64`` for MQAR)."""
    return TASKS[task].label(config)
