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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from attnlab.tasks.digits import DigitsConfig
from attnlab.tasks.incontext_regression import ICLRegressionConfig
from attnlab.tasks.match import MatchConfig
from attnlab.tasks.mqar import MQARConfig
from attnlab.tasks.needle import NeedleConfig
from attnlab.tasks.wikitext import WikiTextConfig

__all__ = ["QualityPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class QualityPreset:
    """A named set of task configs.

    Attributes:
        name, description: what ``--list-presets`` prints.
        seeds: default number of seeds (``--seeds`` overrides it).
        tasks: task name -> the configs (variants) to run; each variant is one row of the leaderboard.
    """

    name: str
    description: str
    seeds: int
    tasks: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", MappingProxyType({k: tuple(v) for k, v in dict(self.tasks).items()}))


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
        "wikitext": [WikiTextConfig(length=32, dim=16, heads=2, steps=8, batch_size=8, validation_windows=16)],
    },
)

QUICK = QualityPreset(
    name="quick",
    description="the demo on a 2-core CPU: MQAR shrunk to vocabulary 128, length 32, 4 pairs, batch 64, "
                "500 steps; in-context regression 300 steps (batch 64); digits 150 steps",
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
        "wikitext": [WikiTextConfig(length=64, dim=32, heads=4, steps=200, batch_size=16, validation_windows=100)],
    },
)

STANDARD = QualityPreset(
    name="standard",
    description="zoology's MQAR (vocab 8192; L64/8 pairs and L256/16 pairs; widths 64, 128; one head; "
                "without and with a kernel-3 short convolution in block 0) and the paper settings of the other "
                "tasks",
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
)

FULL = QualityPreset(
    name="full",
    description="longer sequences, more pairs, wider models and 5 seeds (a GPU or a long CPU run)",
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
)

PRESETS: dict[str, QualityPreset] = {p.name: p for p in (SMOKE, QUICK, STANDARD, FULL)}


def get_preset(name: str) -> QualityPreset:
    """The preset called ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})") from None
