"""Data sets as whole tensors, and the on-device augmentation and batching of training.

``load_dataset(name, split)`` returns ``(x, y)``: ``x`` float32 NCHW in [0, 1], ``y`` int64.
Every split fits in memory (CIFAR-10's training split is 0.6 GB in float32), so training
moves it to the device once and then only indexes it: no loader, no per-batch CPU work.

- ``digits``: the 8x8 handwritten digits scikit-learn bundles (1,797 images, 1x8x8, grey levels
  0..16 scaled to [0, 1]), split once, stratified and seeded, into 1,077 train / 360 val /
  360 test images. ``digits.npz`` beside this file holds the images and that split, as
  scikit-learn gives them (tests/test_data.py checks it and writes it): importing scikit-learn
  took 1.5-2.5 s in every process that loads the digits, each Ray trial's among them.
- ``cifar10``: the standard python ``cifar-10-batches-py`` folder under ``root`` (default:
  ``ADVORCH_DATA_DIR``). Validation is every 50th image of the training batches (1,000),
  train the other 49,000, test the 10,000 of ``test_batch``.
- ``synthetic``: seeded class prototypes plus noise, learnable, any shape (``synthetic_dataset``);
  ``load_dataset("synthetic", ...)`` gives 1x8x8 images, 512 train / 128 val / 128 test.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from workers.models.normalization import Normalization

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "synthetic": 10}

DIGITS_FILE = Path(__file__).with_name("digits.npz")

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_VAL_EVERY = 50  # every 50th training image is validation: 1,000 of 50,000

SYNTHETIC_SIZES = {"train": 512, "val": 128, "test": 128}
SYNTHETIC_SHAPE = (1, 8, 8)

# Each data set's per-channel pixel mean and std (of its training split), for model.normalize:
# CIFAR-10's as Rice et al.'s train_cifar.py has them; the others measured here.
NORMALIZATIONS = {
    "cifar10": Normalization(mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616)),
    "digits": Normalization(mean=(0.3053,), std=(0.3760,)),
    "synthetic": Normalization(mean=(0.4949,), std=(0.3091,)),
}


def load_dataset(
    name: str, split: str, root: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of one split (``train``, ``val`` or ``test``) of a data set."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if name == "digits":
        return _digits(split)
    if name == "cifar10":
        return _cifar10(split, _cifar10_folder(root))
    if name == "synthetic":
        seed = SPLITS.index(split) + 1  # the prototypes are shared; the noise differs per split
        return synthetic_dataset(SYNTHETIC_SIZES[split], shape=SYNTHETIC_SHAPE, noise_seed=seed)
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(NUM_CLASSES)}")


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(DIGITS_FILE) as digits:
        chosen = digits[split]
        images, labels = digits["images"][chosen], digits["labels"][chosen]
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(labels, dtype=torch.int64)


def _cifar10_folder(root: Path | None) -> Path:
    if root is None:
        # Workers know nothing of the service's settings: the job hands them the data folder.
        if "ADVORCH_DATA_DIR" not in os.environ:
            raise ValueError(
                "cifar10 needs root= (the folder holding cifar-10-batches-py) or ADVORCH_DATA_DIR"
            )
        root = Path(os.environ["ADVORCH_DATA_DIR"])
    return Path(root) / CIFAR10_FOLDER


def _cifar10(split: str, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    expected = (
        f"the python version of CIFAR-10: {', '.join(CIFAR10_TRAIN_FILES)} and {CIFAR10_TEST_FILE}"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {folder} (expected {expected})")
    files = CIFAR10_TRAIN_FILES if split in ("train", "val") else (CIFAR10_TEST_FILE,)
    batches = [_cifar10_batch(folder / file, expected) for file in files]
    x = torch.cat([images for images, _ in batches])
    y = torch.cat([labels for _, labels in batches])
    if split != "test":
        is_val = torch.arange(len(y)) % CIFAR10_VAL_EVERY == 0
        keep = is_val if split == "val" else ~is_val
        x, y = x[keep], y[keep]
    return x, y


def _cifar10_batch(path: Path, expected: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch: ``data`` (N x 3072 uint8, channel-major) and ``labels``."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file missing: {path} (expected {expected})")
    try:
        with path.open("rb") as file:
            batch: dict[bytes, Any] = pickle.load(file, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # unpickling or reshaping a damaged file raises many kinds
        raise ValueError(f"corrupt CIFAR-10 file {path}: {err!r} (expected {expected})") from err
    if len(labels) != len(data) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"corrupt CIFAR-10 file {path}: labels do not match the images")
    return torch.from_numpy(data).float().div_(255), torch.from_numpy(labels)


def synthetic_dataset(
    num_examples: int,
    *,
    shape: tuple[int, ...] = SYNTHETIC_SHAPE,
    num_classes: int = 10,
    noise: float = 0.15,
    prototype_seed: int = 0,
    noise_seed: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``shape`` in [0, 1]: one random prototype per class plus Gaussian noise.

    The same ``prototype_seed`` gives the same classes, so splits made with different
    ``noise_seed`` come from one distribution and a model can learn it.
    """
    prototypes = torch.rand(
        (num_classes, *shape), generator=torch.Generator().manual_seed(prototype_seed)
    )
    generator = torch.Generator().manual_seed(noise_seed)
    y = torch.randint(num_classes, (num_examples,), generator=generator)
    x = prototypes[y] + noise * torch.randn((num_examples, *shape), generator=generator)
    return x.clamp_(0, 1), y


@dataclass(frozen=True)
class Augmentation:
    """Random translation by up to ``pad`` pixels (zero padding, then a random crop) and,
    when ``flip``, a random horizontal flip."""

    pad: int = 0
    flip: bool = False


# CIFAR-10: the field's standard crop with 4-pixel padding and flip. Digits are not
# mirror-symmetric, so no flip; a 1-pixel shift is the crop's analogue at 8x8.
AUGMENTATIONS = {
    "cifar10": Augmentation(pad=4, flip=True),
    "digits": Augmentation(pad=1, flip=False),
    "synthetic": Augmentation(),
}


def augment(x: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """A randomly shifted (and flipped) copy of the batch ``x``, made on ``x``'s device."""
    n, _, height, width = x.shape
    if augmentation.pad:
        pad = augmentation.pad
        padded = F.pad(x, (pad, pad, pad, pad))
        top = torch.randint(2 * pad + 1, (n, 1), device=x.device)
        left = torch.randint(2 * pad + 1, (n, 1), device=x.device)
        rows = (top + torch.arange(height, device=x.device))[:, None, :, None]
        cols = (left + torch.arange(width, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if augmentation.flip:
        flipped = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    return x
