"""Synthetic needle-in-a-haystack retrieval for small language models.

A haystack of random tokens hides one needle ``[NEEDLE, key, value]`` at a random depth; the prompt
ends with ``[QUERY, key]`` and the model must output ``value`` at the last position. Tokens 0 and 1
are the markers ``NEEDLE`` and ``QUERY``; keys, values and haystack tokens are drawn from
``2 .. vocab_size - 1``. The label is -100 everywhere except the last position. (A synthetic stand-in,
in the spirit of Kamradt's "needle in a haystack" test and the retrieval probes of Wu et al.,
"Retrieval Head Mechanistically Explains Long-Context Factuality", arXiv 2404.15574.)

Worked example (``vocab_size=10, length=10``; needle ``[0, 2, 3]`` at depth 1, key 2, value 3)::

    position:  0    1    2    3    4    5    6    7    8    9
    inputs:    7    0    2    3    9    3    5    7    1    2
    labels: -100 -100 -100 -100 -100 -100 -100 -100 -100    3
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.tasks.mqar import IGNORE_INDEX

__all__ = ["NeedleConfig", "sample_needle", "NEEDLE", "QUERY"]

NEEDLE, QUERY = 0, 1


@dataclass(frozen=True)
class NeedleConfig:
    """Haystack length, vocabulary and the training recipe (a small causal LM)."""

    vocab_size: int = 64
    length: int = 128
    dim: int = 64
    depth: int = 2
    heads: int = 4
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    test_examples: int = 500


def sample_needle(num_examples: int, *, vocab_size: int, length: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs, labels, depth)``: ``[n, length]`` tokens and labels, and the needle's start ``[n]``."""
    if vocab_size < 4:
        raise ValueError(f"vocab_size={vocab_size} must be at least 4 (two markers, keys and values)")
    if length < 6:
        raise ValueError(f"length={length} must be at least 6 (needle, filler, query)")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = num_examples
    inputs = torch.randint(2, vocab_size, (n, length), generator=generator)
    key = torch.randint(2, vocab_size, (n,), generator=generator)
    value = torch.randint(2, vocab_size, (n,), generator=generator)
    depth = torch.randint(0, length - 5, (n,), generator=generator)  # needle occupies depth .. depth+2
    rows = torch.arange(n)
    inputs[rows, depth] = NEEDLE
    inputs[rows, depth + 1] = key
    inputs[rows, depth + 2] = value
    inputs[:, -2] = QUERY
    inputs[:, -1] = key
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.int64)
    labels[:, -1] = value
    return inputs, labels, depth
