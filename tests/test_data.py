"""Data sets, on-device augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from workers.data import (
    DIGITS_FILE,
    SPLITS,
    Augmentation,
    augment,
    load_dataset,
    synthetic_dataset,
)

DIGITS_VAL_SIZE = 360
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


def digits_as_scikit_learn_gives_them() -> dict[str, np.ndarray]:
    """What ``workers/digits.npz`` holds: scikit-learn's digits (grey levels 0..16, labels) and
    their split, stratified and seeded, into train / val / test indices. scikit-learn is a
    dev dependency only: the workers read the file."""
    images, labels = load_digits(return_X_y=True)
    indices = np.arange(len(labels))
    rest, test = train_test_split(
        indices, test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    train, val = train_test_split(
        rest, test_size=DIGITS_VAL_SIZE, stratify=labels[rest], random_state=DIGITS_SPLIT_SEED
    )
    return {
        "images": images.astype(np.uint8),
        "labels": labels.astype(np.uint8),
        "train": train.astype(np.int16),
        "val": val.astype(np.int16),
        "test": test.astype(np.int16),
    }


def test_the_bundled_digits_are_scikit_learns_and_their_split() -> None:
    expected = digits_as_scikit_learn_gives_them()
    with np.load(DIGITS_FILE) as bundled:
        assert sorted(bundled.files) == sorted(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(bundled[name], array, err_msg=name)
    # And the loader gives each split of the file: grey levels 0..16 scaled to [0, 1].
    for split in SPLITS:
        x, y = load_dataset("digits", split)
        chosen = expected[split]
        images = torch.tensor(expected["images"][chosen] / 16.0, dtype=torch.float32)
        torch.testing.assert_close(x, images.view(-1, 1, 8, 8), msg=split)
        assert y.tolist() == expected["labels"][chosen].tolist(), split


def test_digits_splits_are_stratified_disjoint_and_cover_every_image() -> None:
    splits = {split: load_dataset("digits", split) for split in ("train", "val", "test")}

    assert {split: len(y) for split, (_, y) in splits.items()} == {
        "train": 1077,
        "val": 360,
        "test": 360,
    }
    for x, y in splits.values():
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8)
        assert x.min() >= 0 and x.max() <= 1
        # Stratified: each of the 10 classes holds its share (about a tenth) of every split.
        assert (y.bincount(minlength=10) - len(y) / 10).abs().max() <= 5
    images = torch.cat([x.flatten(1) for x, _ in splits.values()])
    all_digits = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    # Every original image exactly once (the bundled set has a few exact duplicates).
    assert sorted(map(tuple, images.tolist())) == sorted(map(tuple, all_digits.tolist()))


def test_digits_split_is_the_same_every_time() -> None:
    x1, y1 = load_dataset("digits", "val")
    x2, y2 = load_dataset("digits", "val")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_cifar10_reads_the_standard_folder(tiny_cifar10_root: Path) -> None:
    x_train, y_train = load_dataset("cifar10", "train", tiny_cifar10_root)
    x_val, y_val = load_dataset("cifar10", "val", tiny_cifar10_root)
    x_test, y_test = load_dataset("cifar10", "test", tiny_cifar10_root)

    # Every 50th of the 100 training images is validation.
    assert (len(x_train), len(x_val), len(x_test)) == (98, 2, 10)
    assert x_train.shape[1:] == (3, 32, 32) and x_train.dtype == torch.float32
    # Test image i has label i % 10 and pixel (c, h, w) = (i + c + h + w) % 256, channel-major.
    assert y_test.tolist() == list(range(10))
    c, h, w = torch.meshgrid(torch.arange(3), torch.arange(32), torch.arange(32), indexing="ij")
    for i in (0, 7):
        torch.testing.assert_close(x_test[i], ((i + c + h + w) % 256).float() / 255)
    # Validation is image 0 of data_batch_1 and image 10 of data_batch_3.
    assert y_val.tolist() == [0, 0]
    torch.testing.assert_close(x_val[1], ((10 + c + h + w) % 256).float() / 255)
    assert y_train.dtype == torch.int64


def test_cifar10_root_defaults_to_advorch_data_dir(
    tiny_cifar10_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADVORCH_DATA_DIR", str(tiny_cifar10_root))
    x, _ = load_dataset("cifar10", "test")
    assert len(x) == 10
    monkeypatch.delenv("ADVORCH_DATA_DIR")
    with pytest.raises(ValueError, match="ADVORCH_DATA_DIR"):
        load_dataset("cifar10", "test")


def test_a_missing_cifar10_folder_names_the_path_and_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar10", "train", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message


def test_a_corrupt_cifar10_file_is_named(tiny_cifar10_root: Path) -> None:
    damaged = tiny_cifar10_root / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(b"\x80\x04 this is not a pickled batch")
    with pytest.raises(ValueError, match=r"corrupt CIFAR-10 file .*data_batch_3"):
        load_dataset("cifar10", "train", tiny_cifar10_root)
    (tiny_cifar10_root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", "test", tiny_cifar10_root)


def test_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_dataset("digits", "validation")


def test_synthetic_data_is_seeded_any_shape_and_in_range() -> None:
    x1, y1 = synthetic_dataset(64, shape=(3, 5, 7), num_classes=4, noise_seed=3)
    x2, y2 = synthetic_dataset(64, shape=(3, 5, 7), num_classes=4, noise_seed=3)
    x3, _ = synthetic_dataset(64, shape=(3, 5, 7), num_classes=4, noise_seed=4)

    assert x1.shape == (64, 3, 5, 7) and set(y1.tolist()) <= {0, 1, 2, 3}
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.min() >= 0 and x1.max() <= 1
    x_train, _ = load_dataset("synthetic", "train")
    x_test, _ = load_dataset("synthetic", "test")
    assert x_train.shape == (512, 1, 8, 8) and not torch.equal(x_train[:128], x_test)


def _shifts(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image: the translations the augmentation may give."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    size = image.shape[-1]
    return [
        padded[:, top : top + size, left : left + size]
        for top in range(2 * pad + 1)
        for left in range(2 * pad + 1)
    ]


def test_augmentation_translates_each_image_by_at_most_pad_pixels() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 3, 6, 6)

    shifted = augment(x, Augmentation(pad=2, flip=False))

    assert shifted.shape == x.shape
    offsets = []
    for original, out in zip(x, shifted, strict=True):
        matches = [torch.equal(out, crop) for crop in _shifts(original, 2)]
        assert sum(matches) == 1
        offsets.append(matches.index(True))
    assert len(set(offsets)) > 10  # random per image, not one shift for the batch


def test_flip_mirrors_about_half_the_images_and_nothing_else() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 1, 4, 4)

    out = augment(x, Augmentation(pad=0, flip=True))

    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48
    assert torch.equal(augment(x, Augmentation()), x)


if __name__ == "__main__":
    # Write workers/digits.npz again (after a scikit-learn that changes the digits or the split).
    np.savez_compressed(DIGITS_FILE, **digits_as_scikit_learn_gives_them())
