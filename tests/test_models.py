"""The model registry and checkpoint files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from workers.models import (
    available_models,
    build_model,
    load_checkpoint,
    read_checkpoint_meta,
    register_model,
    save_checkpoint,
)
from workers.spec import JobSpec


@pytest.mark.parametrize("arch", ["small_cnn", "preact_resnet18", "wrn_34_10"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_arch_maps_images_to_class_logits(arch: str, in_channels: int) -> None:
    model = build_model(arch, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, in_channels, 8, 8))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_small_cnn_takes_32x32_images() -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("arch", "num_parameters"),
    # The counts of the papers' networks: PreActResNet-18 of Rice et al. and Wong et al.
    # (with the final BatchNorm), WRN-34-10 of TRADES (46.16 M).
    [("preact_resnet18", 11_172_170), ("wrn_34_10", 46_160_474)],
)
def test_paper_architectures_have_the_papers_sizes(arch: str, num_parameters: int) -> None:
    model = build_model(arch, num_classes=10, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == num_parameters


def test_unknown_arch_is_an_error_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"resnet50.*small_cnn"):
        build_model("resnet50")
    assert {"small_cnn", "preact_resnet18", "wrn_34_10"} <= set(available_models())


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("small_cnn")(lambda num_classes=10, in_channels=3: nn.Identity())


def _trained_a_little(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """A few SGD steps in train mode, so weights and BatchNorm buffers are not the initial ones."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def test_a_loaded_checkpoint_predicts_as_the_saved_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(10, (16,))
    model = _trained_a_little(build_model("small_cnn", in_channels=1), x, y).eval()
    spec = JobSpec(name="checkpoint-test")
    meta = {
        "arch": "small_cnn",
        "num_classes": 10,
        "input_shape": (1, 8, 8),
        "spec": spec.model_dump(mode="json"),
        "best_epoch": 3,
    }
    path = save_checkpoint(tmp_path / "best.pt", model, meta)

    loaded = load_checkpoint(path)

    assert not loaded.training
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    saved = read_checkpoint_meta(path)
    assert saved["arch"] == "small_cnn"
    assert saved["input_shape"] == [1, 8, 8]
    assert saved["num_classes"] == 10
    assert saved["best_epoch"] == 3
    assert JobSpec.model_validate(saved["spec"]).model_dump() == spec.model_dump()


def test_a_checkpoint_needs_what_rebuilds_its_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        save_checkpoint(tmp_path / "x.pt", build_model("small_cnn"), {"arch": "small_cnn"})


def test_loading_what_is_not_a_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt is not an advorch checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt is not an advorch checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
