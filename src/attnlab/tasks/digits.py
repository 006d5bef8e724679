"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) for the vision transformer.

Worked example: one image is ``[1, 8, 8]`` with pixel intensities 0..16 scaled to ``[0, 1]``; its
label is the digit, e.g. ``images[0]`` (a "0": a ring of bright pixels) has ``labels[0] == 0``.
The split is a seeded permutation of the image indices: the first ``test_fraction`` of it is the
test set (the same images whatever ``validation_fraction`` is), the next ``validation_fraction`` the
validation set (held out of the training images, for choosing a learning rate), the rest trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DigitsConfig", "DigitsSplit", "load_digits_split"]


@dataclass(frozen=True)
class DigitsConfig:
    """ViT sizes and the training recipe (patch 2 gives 16 patches of 4 pixels)."""

    patch_size: int = 2
    dim: int = 64
    depth: int = 2
    heads: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    test_fraction: float = 0.25
    validation_fraction: float = 0.15


@dataclass(frozen=True)
class DigitsSplit:
    """``train_images [n, 1, 8, 8]`` float32 in [0, 1], ``train_labels [n]`` int64; the same for
    validation and test; ``*_index [n]`` int64: which images of scikit-learn's set each part holds."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    validation_images: torch.Tensor
    validation_labels: torch.Tensor
    train_index: torch.Tensor
    validation_index: torch.Tensor
    test_index: torch.Tensor


def load_digits_split(*, seed: int, test_fraction: float = 0.25, validation_fraction: float = 0.0) -> DigitsSplit:
    """The digits, split into disjoint train, validation and test sets by a permutation drawn from ``seed``
    (``validation_fraction=0``: an empty validation set)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    if not 0 <= validation_fraction < 1 - test_fraction:
        raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1 - test_fraction = "
                         f"{1 - test_fraction:g}) so that some images are left to train on")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install 'attnlab[bench]'") from error
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8)
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    n_validation = int(round(validation_fraction * len(labels)))
    test, validation, train = order[:n_test], order[n_test:n_test + n_validation], order[n_test + n_validation:]
    return DigitsSplit(images[train], labels[train], images[test], labels[test], images[validation],
                       labels[validation], train, validation, test)
