"""Byte-level language modelling on the shortened English Wikipedia dump that gensim's wheel ships.

The text is the ``<text>`` content (XML entities decoded) of the articles in
``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (gensim test data, read
offline), encoded as UTF-8 bytes (vocabulary 256). Whole articles are split into test, validation
and train by a seeded permutation (the first ``test_fraction`` of the articles are the test set, the
next ``validation_fraction`` are held out of the training text to choose a learning rate, the rest
trains); models are scored in bits per byte (mean cross-entropy in nats / ln 2).

Worked example (``length=8``): a window of the bytes of ``"Anarchism is"`` gives
``inputs = b"Anarchis"`` and ``targets = b"narchism"`` (the next byte at every position).
"""

from __future__ import annotations

import bz2
import html
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["WikiTextConfig", "WikiTextSplit", "load_wikipedia_text", "load_wikitext_split", "sample_windows",
           "bits_per_byte", "WIKIPEDIA_FILE"]

WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class WikiTextConfig:
    """Window length, the model sizes and the training recipe."""

    length: int = 128
    dim: int = 64
    depth: int = 2
    heads: int = 4
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    test_fraction: float = 0.1
    test_windows: int = 200
    validation_fraction: float = 0.1
    validation_windows: int = 200


@dataclass(frozen=True)
class WikiTextSplit:
    """``train``, ``validation`` and ``test`` byte streams (uint8 tensors) and the indices of the
    articles (in :func:`load_wikipedia_text`) each one joins."""

    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    train_articles: tuple[int, ...]
    validation_articles: tuple[int, ...]
    test_articles: tuple[int, ...]


@lru_cache(maxsize=1)
def load_wikipedia_text() -> tuple[str, ...]:
    """The article texts (markup inside them kept as is)."""
    try:
        from gensim.test.utils import datapath
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the wikitext task needs gensim (its wheel ships the text): pip install gensim") from error
    path = Path(datapath(WIKIPEDIA_FILE))
    if not path.exists():  # pragma: no cover
        raise FileNotFoundError(f"{path} is missing from the installed gensim wheel")
    xml = bz2.decompress(path.read_bytes()).decode("utf-8")
    articles = re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.DOTALL)
    return tuple(html.unescape(a) for a in articles if len(a) > 1000)


def load_wikitext_split(*, seed: int = 0, test_fraction: float = 0.1,
                        validation_fraction: float = 0.1) -> WikiTextSplit:
    """Train / validation / test byte streams; each article goes to one of them, chosen by ``seed``.

    The test articles depend on ``seed`` and ``test_fraction`` only; the validation articles are
    taken from what would otherwise train (``validation_fraction=0``: an empty validation stream).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    if not 0 <= validation_fraction < 1 - test_fraction:
        raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1 - test_fraction = "
                         f"{1 - test_fraction:g}) so that some articles are left to train on")
    articles = load_wikipedia_text()
    order = torch.randperm(len(articles), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, int(round(test_fraction * len(articles))))
    n_validation = int(round(validation_fraction * len(articles)))
    test, validation, train = order[:n_test], order[n_test:n_test + n_validation], order[n_test + n_validation:]

    def stream(indices: list[int]) -> torch.Tensor:
        data = "\n".join(articles[i] for i in indices).encode("utf-8")
        if not data:  # torch.frombuffer refuses an empty buffer
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    return WikiTextSplit(train=stream(train), validation=stream(validation), test=stream(test),
                         train_articles=tuple(train), validation_articles=tuple(validation),
                         test_articles=tuple(test))


def sample_windows(data: torch.Tensor, *, batch_size: int, length: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` ``[batch_size, length]`` int64: random windows and the next byte of each."""
    if data.numel() <= length + 1:
        raise ValueError(f"data has {data.numel()} bytes, fewer than length + 1 = {length + 1}")
    starts = torch.randint(0, data.numel() - length - 1, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(length + 1)  # (B, length+1)
    window = data[index].long()
    return window[:, :-1], window[:, 1:]


def bits_per_byte(cross_entropy_nats: float) -> float:
    """Mean cross-entropy per byte in nats -> bits per byte."""
    return cross_entropy_nats / math.log(2)
