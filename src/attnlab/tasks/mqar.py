"""Multi-query associative recall (MQAR), as zoology defines it.

Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language Models",
arXiv 2312.04927 (the generator follows ``zoology/data/multiquery_ar.py``). The key-value pairs come
first; each key is queried once later, at a gap drawn from a power law (``power_a=0.01`` puts most
queries early); the tokens between queries are random filler; a label sits only where the model must
output a value (-100 elsewhere, ignored by the loss and the accuracy). Zoology requires
``vocab_size > seq_len``, ``seq_len`` even and ``4 * num_pairs <= seq_len``; so does this generator.

Worked example (``vocab_size=20, num_pairs=2, seq_len=16, random_non_queries=False``; keys are drawn
from ``1 .. vocab/2 - 1``, values from ``vocab/2 .. vocab - 1``; gaps 0 and 4)::

    position:  0    1    2    3    4    5    6    7    8    9   10   11   12   13   14   15
    inputs:    7   14    8   10    7    0    0    0    0    0    0    0    8    0    0    0
    labels: -100 -100 -100 -100   14 -100 -100 -100 -100 -100 -100 -100   10 -100 -100 -100

The label of position t is the token the model must predict after reading inputs[..t]: at the query
``7`` (position 4) the answer is its value ``14``. With ``random_non_queries=True`` the zeros become
random tokens of the whole vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MQARConfig", "multiquery_ar", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting: data sizes and the training recipe (two layers, AdamW, cosine schedule).

    Zoology's standard: ``vocab_size=8192``, ``seq_len=64`` with 8 pairs and 256 with 16 pairs,
    widths 64 and 128, ``power_a=0.01``; its attention baseline has one head (head dim = width),
    GPT-2 initialisation (embeddings ``N(0, 0.02^2)``) and a read-out tied to the token embedding:
    the defaults here. ``init_std=None`` keeps PyTorch's ``N(0, 1)`` embeddings.

    Measured on this CPU (softmax, vocabulary 8192, length 64, 8 pairs, width 64, batch 64, 2500 steps):
    one head with the zoology initialisation reached 0.997 accuracy (the jump from 0.08 came between
    steps 900 and 1300); four heads of dim 16 stayed at 0.08-0.09 for 1200 steps; one head with
    PyTorch's default initialisation and an untied read-out did not learn (loss 8.34 = ln 4096 at
    step 1000).

    ``short_conv=K`` (0: none) gives the model a gated causal short convolution of kernel ``K`` before the
    mixer of the blocks named by ``short_conv_layers`` ("all" or "first", zoology's placement), the same
    for every mechanism (:class:`attnlab.nn.short_conv.ShortConvolution`).
    """

    vocab_size: int = 8192
    seq_len: int = 64
    num_pairs: int = 8
    dim: int = 64
    depth: int = 2
    heads: int = 1
    power_a: float = 0.01
    steps: int = 2500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    test_examples: int = 1000
    init_std: float | None = 0.02
    tie_embeddings: bool = True
    short_conv: int = 0
    short_conv_layers: str = "all"


def _check_sizes(vocab_size: int, seq_len: int, num_pairs: int, power_a: float) -> None:
    if seq_len % 2 != 0:
        raise ValueError(f"seq_len={seq_len} must be even")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size={vocab_size} must be larger than seq_len={seq_len}")
    if num_pairs < 1 or 4 * num_pairs > seq_len:
        raise ValueError(f"num_pairs={num_pairs} must be between 1 and seq_len/4={seq_len // 4}")
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(f"num_pairs={num_pairs} needs at least {num_pairs} distinct keys; vocab_size={vocab_size}")
    if not power_a > 0:
        raise ValueError(f"power_a={power_a} must be positive")


def _distinct(num_examples: int, low: int, high: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct integers from ``[low, high)`` per row, uniformly: ``[num_examples, size]``."""
    scores = torch.rand(num_examples, high - low, generator=generator)
    return scores.topk(size, dim=1).indices + low


def multiquery_ar(num_examples: int, *, vocab_size: int = 8192, seq_len: int = 64, num_pairs: int = 8,
                  power_a: float = 0.01, random_non_queries: bool = True,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``, both ``[num_examples, seq_len]`` int64; labels are -100 except at queries.

    Gaps are drawn without replacement with probability ``p(g) ∝ power_a * g^(power_a - 1)``,
    ``g = 1 .. (seq_len - 2 * num_pairs) / 2`` (zoology's power law), via Gumbel top-k, which has the
    same distribution as sequential sampling without replacement.
    """
    _check_sizes(vocab_size, seq_len, num_pairs, power_a)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = num_examples
    context = 2 * num_pairs
    key_vocab = vocab_size // 2
    keys = _distinct(n, 1, key_vocab, num_pairs, generator)  # (n, P)
    values = _distinct(n, key_vocab, vocab_size, num_pairs, generator)  # (n, P)

    space = (seq_len - context) // 2
    log_p = math.log(power_a) + (power_a - 1) * torch.log(torch.arange(1, space + 1, dtype=torch.float64))
    gumbel = -torch.log(-torch.log(torch.rand(n, space, generator=generator, dtype=torch.float64)))
    gaps = (log_p + gumbel).topk(num_pairs, dim=1).indices  # (n, P), distinct, in [0, space)

    sequence = torch.zeros(n, seq_len + 1, dtype=torch.int64)
    sequence[:, 0:context:2] = keys
    sequence[:, 1:context:2] = values
    sequence.scatter_(1, context + 2 * gaps, keys)
    targets = torch.full((n, seq_len + 1), IGNORE_INDEX, dtype=torch.int64)
    targets.scatter_(1, context + 2 * gaps + 1, values)
    inputs, labels = sequence[:, :-1].clone(), targets[:, 1:].clone()
    if random_non_queries:
        filler = torch.randint(vocab_size, inputs.shape, generator=generator)
        inputs = torch.where(inputs == 0, filler, inputs)
    return inputs, labels
