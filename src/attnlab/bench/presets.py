"""Presets of the quality benchmark: typed configs per task (``attnlab bench quality --list-presets``).

- ``smoke``: tiny everything, for the tests (seconds).
- ``quick``: what ``attnlab demo`` runs on a 2-core CPU in a few minutes. It shrinks zoology's MQAR
  (vocabulary 8192 -> 128, length 64 -> 32, 8 -> 4 pairs, 2500 -> 500 steps; width 64 and batch 64
  kept; 4 heads; PyTorch's default initialisation, which learns this small vocabulary where zoology's
  GPT-2 initialisation does not). Softmax reached 0.999, 0.984, 0.284 and 0.990 on seeds 0-3 (a script
  redrawing the N(0, 1) embeddings; the demo's own seed 0 gave 1.000): the
  jump to recall happens within 500 steps on most seeds, not all, so one seed can rank a mechanism
  low by chance. It cuts in-context regression to 300 steps (batch 64, lr 3e-3) and the digits ViT to
  150 steps; the ranking it shows is indicative, not the paper's.
- ``standard``: zoology's MQAR settings (vocabulary 8192; length 64 with 8 pairs and 256 with 16
  pairs; widths 64 and 128; one head, GPT-2 initialisation with a tied read-out; 2500 steps, batch 64,
  AdamW 3e-3, cosine), each without and with a kernel-3 gated short convolution in the first block
  (the form zoology and Based train, ``-conv3-first`` in the labels), the in-context regression
  paper setting (d=5, L=40, noise variance 0.1, Adam 1e-3, batch 256; 4 heads and 1 head; 5000 steps with
  a cosine schedule where the paper trains 500k), Match3 and
  Match2 at length 16, needle at length 128, digits and byte-level Wikipedia.
- ``full``: longer sequences, more pairs and more seeds; meant for a GPU or a long CPU run.

Learning-rate sweeps (``QualityPreset.lrs``; ``attnlab bench quality --lrs`` overrides them). A
mechanism can rank last because the rate tuned for softmax is wrong for it, so ``standard`` and
``full`` train every (task variant, mechanism, seed) at each rate of its task's sweep; the best rate is
chosen per (task variant, mechanism) on a validation split and the test metric is reported at that
rate. The grids:

- MQAR: ``1e-4, 3e-4, 1e-3, 3e-3, 1e-2``, the sweep of zoology ("Zoology: Measuring and Improving
  Recall in Efficient Language Models", arXiv 2312.04927); the single rate 3e-3 the MQAR configs
  trained at before is its fourth point.
- in-context regression: ``3e-4, 1e-3, 3e-3``, half a decade either side of the paper's Adam 1e-3
  ("In-Context Linear Regression Demystified", arXiv 2503.12734).
- match3, match2: ``3e-4, 1e-3, 3e-3`` around their configs' 1e-3.
- needle: ``1e-3, 3e-3, 1e-2`` around its 3e-3 (the MQAR recipe it shares its decoder with).
- digits, wikitext: ``6e-4, 2e-3, 6e-3``, a factor of about 3 either side of their 2e-3.

Three points where the task has one tuned rate to centre on, five for MQAR, where the linear family's
low accuracy is the question a sweep must answer. ``smoke`` and ``quick`` keep each config's one rate
(the demo must stay within minutes); their records carry a one-rate ``sweep`` (not swept).

Every preset scores every run on a validation split as well as on the test set (see
:mod:`attnlab.bench.quality_tasks`): for digits that holds 15 % of the images out of training
(``DigitsConfig.validation_fraction``; the test quarter is unchanged), for wikitext 10 % of the articles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from attnlab.cli_errors import UsageError
from attnlab.tasks.digits import DigitsConfig
from attnlab.tasks.incontext_regression import ICLRegressionConfig
from attnlab.tasks.match import MatchConfig
from attnlab.tasks.mqar import MQARConfig
from attnlab.tasks.needle import NeedleConfig
from attnlab.tasks.wikitext import WikiTextConfig

__all__ = ["QualityPreset", "PRESETS", "get_preset", "check_learning_rates", "parse_learning_rates",
           "ZOOLOGY_MQAR_LRS"]

ZOOLOGY_MQAR_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # zoology's sweep (arXiv 2312.04927)
_AROUND_1E3 = (3e-4, 1e-3, 3e-3)
_AROUND_2E3 = (6e-4, 2e-3, 6e-3)
_AROUND_3E3 = (1e-3, 3e-3, 1e-2)


def check_learning_rates(values: Sequence[float], *, name: str = "lrs") -> tuple[float, ...]:
    """``values`` as a tuple of floats; ``ValueError`` naming ``name`` unless they are positive, finite,
    distinct and at least one."""
    rates = tuple(float(v) for v in values)
    if not rates:
        raise ValueError(f"{name} is empty; give at least one learning rate, e.g. {name}=(1e-3,)")
    bad = [v for v in rates if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"{name}={rates} holds {bad}: learning rates must be positive finite floats, e.g. 3e-3")
    if len(set(rates)) != len(rates):
        raise ValueError(f"{name}={rates} repeats a rate; list each rate once")
    return rates


def parse_learning_rates(text: str) -> tuple[float, ...]:
    """``--lrs 1e-3,3e-3`` -> ``(0.001, 0.003)``; a :class:`~attnlab.cli_errors.UsageError` naming
    ``--lrs`` for anything but a comma list of distinct positive finite floats."""
    fix = "give a comma list of positive learning rates, e.g. --lrs 1e-3,3e-3 (or --lrs 3e-3 for one rate)"
    rates = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            rate = float(part)
        except ValueError:
            raise UsageError(f"--lrs {text!r}: {part!r} is not a number; {fix}") from None
        if not (math.isfinite(rate) and rate > 0):
            raise UsageError(f"--lrs {text!r}: {part} is not a positive finite learning rate; {fix}")
        if rate in rates:
            raise UsageError(f"--lrs {text!r}: {part} is listed twice; list each rate once")
        rates.append(rate)
    if not rates:
        raise UsageError(f"--lrs {text!r} lists no learning rate; {fix}")
    return tuple(rates)


@dataclass(frozen=True)
class QualityPreset:
    """A named set of task configs.

    Attributes:
        name, description: what ``--list-presets`` prints.
        seeds: default number of seeds (``--seeds`` overrides it).
        tasks: task name -> the configs (variants) to run; each variant is one row of the leaderboard.
        lrs: task name -> the learning rates to sweep for every variant of that task; a task not
            listed trains at its config's own ``lr`` (not swept).
    """

    name: str
    description: str
    seeds: int
    tasks: Any = field(default_factory=dict)
    lrs: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", MappingProxyType({k: tuple(v) for k, v in dict(self.tasks).items()}))
        # a sweep for a task without configs is allowed: --variants may drop a task's every config
        object.__setattr__(self, "lrs", MappingProxyType(
            {t: check_learning_rates(v, name=f"lrs[{t!r}]") for t, v in dict(self.lrs).items()}))

    def sweep(self, task: str, config: Any) -> tuple[float, ...]:
        """The learning rates to train ``config`` (a variant of ``task``) at: the preset's sweep for the
        task, or the config's own ``lr`` alone."""
        return self.lrs.get(task, (float(config.lr),))


SMOKE = QualityPreset(
    name="smoke", description="tiny sizes and a few steps per task (tests; seconds)", seeds=1,
    tasks={
        "mqar": [MQARConfig(vocab_size=64, seq_len=16, num_pairs=2, dim=16, heads=2, steps=8, batch_size=16,
                            test_examples=64)],
        "incontext_regression": [ICLRegressionConfig(dim=3, length=8, heads=2, steps=8, batch_size=32,
                                                     test_examples=256)],
        "match3": [MatchConfig(order=3, length=8, modulus=40, dim=16, heads=2, steps=8, batch_size=32,
                               test_examples=64)],
        "match2": [MatchConfig(order=2, length=8, modulus=12, dim=16, heads=2, steps=8, batch_size=32,
                               test_examples=64)],
        "needle": [NeedleConfig(vocab_size=16, length=16, dim=16, heads=2, steps=8, batch_size=16,
                                test_examples=64)],
        "digits": [DigitsConfig(patch_size=4, dim=16, heads=2, steps=8, batch_size=32)],
        "wikitext": [WikiTextConfig(length=32, dim=16, heads=2, steps=8, batch_size=8, test_windows=16,
                                     validation_windows=16)],
    },
)

QUICK = QualityPreset(
    name="quick",
    description="the demo on a 2-core CPU: MQAR shrunk to vocabulary 128, length 32, 4 pairs, batch 64, "
                "500 steps; in-context regression 300 steps (batch 64); digits 150 steps; one learning rate per task "
                "(not swept)",
    seeds=1,
    tasks={
        "mqar": [MQARConfig(vocab_size=128, seq_len=32, num_pairs=4, dim=64, heads=4, steps=500, batch_size=64,
                            lr=3e-3, test_examples=500, init_std=None, tie_embeddings=False)],
        "incontext_regression": [ICLRegressionConfig(heads=4, steps=300, batch_size=64, lr=3e-3,
                                                     test_examples=2000)],
        "match3": [MatchConfig(order=3, length=16, modulus=185, dim=32, heads=4, steps=300, batch_size=64,
                               test_examples=1000)],
        "match2": [MatchConfig(order=2, length=16, modulus=24, dim=32, heads=4, steps=300, batch_size=64,
                               test_examples=1000)],
        "needle": [NeedleConfig(vocab_size=32, length=64, dim=32, heads=4, steps=300, test_examples=500)],
        "digits": [DigitsConfig(dim=32, heads=4, steps=150, batch_size=64, lr=3e-3)],
        "wikitext": [WikiTextConfig(length=64, dim=32, heads=4, steps=200, batch_size=16, test_windows=100,
                                     validation_windows=100)],
    },
)

STANDARD = QualityPreset(
    name="standard",
    description="zoology's MQAR (vocab 8192; L64/8 pairs and L256/16 pairs; widths 64, 128; one head; "
                "without and with a kernel-3 short convolution in block 0) and the paper settings of the other "
                "tasks; learning rates swept (MQAR 1e-4..1e-2 in 5 points, the other tasks 3 points)",
    seeds=3,
    tasks={
        "mqar": [MQARConfig(seq_len=length, num_pairs=pairs, dim=width, short_conv=conv,
                            short_conv_layers="first")
                 for conv in (0, 3) for length, pairs in ((64, 8), (256, 16)) for width in (64, 128)],
        "incontext_regression": [ICLRegressionConfig(heads=4, steps=5000),
                                 ICLRegressionConfig(heads=1, steps=5000)],
        "match3": [MatchConfig(order=3, length=16, modulus=185, dim=32, depth=1, heads=4, steps=3000)],
        "match2": [MatchConfig(order=2, length=16, modulus=24, dim=32, depth=1, heads=4, steps=3000)],
        "needle": [NeedleConfig()],
        "digits": [DigitsConfig()],
        "wikitext": [WikiTextConfig()],
    },
    lrs={"mqar": ZOOLOGY_MQAR_LRS, "incontext_regression": _AROUND_1E3, "match3": _AROUND_1E3,
         "match2": _AROUND_1E3, "needle": _AROUND_3E3, "digits": _AROUND_2E3, "wikitext": _AROUND_2E3},
)

FULL = QualityPreset(
    name="full",
    description="longer sequences, more pairs, wider models and 5 seeds, learning rates swept as in standard "
                "(a GPU or a long CPU run)",
    seeds=5,
    tasks={
        "mqar": [MQARConfig(seq_len=length, num_pairs=pairs, dim=width, steps=5000, short_conv=conv,
                            short_conv_layers="first")
                 for conv in (0, 3) for length, pairs in ((64, 8), (128, 16), (256, 32), (512, 64))
                 for width in (64, 128, 256)],
        "incontext_regression": [ICLRegressionConfig(heads=h, steps=100000) for h in (1, 2, 4, 8)],
        "match3": [MatchConfig(order=3, length=32, modulus=700, dim=w, depth=1, heads=4, steps=10000)
                   for w in (32, 64, 128)],
        "match2": [MatchConfig(order=2, length=32, modulus=46, dim=w, depth=1, heads=4, steps=10000)
                   for w in (32, 64, 128)],
        "needle": [NeedleConfig(length=n, steps=4000) for n in (256, 512, 1024)],
        "digits": [DigitsConfig(dim=128, depth=4, steps=3000)],
        "wikitext": [WikiTextConfig(length=256, dim=128, depth=4, steps=10000)],
    },
    lrs={"mqar": ZOOLOGY_MQAR_LRS, "incontext_regression": _AROUND_1E3, "match3": _AROUND_1E3,
         "match2": _AROUND_1E3, "needle": _AROUND_3E3, "digits": _AROUND_2E3, "wikitext": _AROUND_2E3},
)

PRESETS: dict[str, QualityPreset] = {p.name: p for p in (SMOKE, QUICK, STANDARD, FULL)}


def get_preset(name: str) -> QualityPreset:
    """The preset called ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})") from None
