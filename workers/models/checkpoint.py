"""One checkpoint file per model: its weights and what is needed to rebuild and use it; and
``load_model``, which also takes a ``torch.export`` program (any PyTorch classifier).

The checkpoint is a ``torch.save`` of plain data (tensors, numbers, strings, lists, dicts), so
``load_checkpoint`` reads it with ``weights_only=True``: loading a downloaded checkpoint runs
no code from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.device import unwrap
from workers.model_format import model_format
from workers.models.normalization import Normalization
from workers.models.registry import build_model

FORMAT_VERSION = 1
# What every checkpoint must say to rebuild its model; anything else in meta (the job spec,
# the best epoch, its metrics, the input normalisation) is kept as given.
REQUIRED_META = ("arch", "num_classes", "input_shape")


def save_checkpoint(path: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights with ``meta`` to ``path``; returns the path.

    ``meta`` must hold ``arch`` (a registered name), ``num_classes`` and ``input_shape``
    (C, H, W), and ``normalization`` (``Normalization.as_meta()``) when the model has its input
    normalisation as its first layer; the training loop adds ``spec`` (the job spec, as a dict),
    ``best_epoch`` and ``metrics``.
    """
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"checkpoint meta is missing {missing}; it needs {list(REQUIRED_META)}")
    state_dict = {name: t.detach().cpu() for name, t in unwrap(model).state_dict().items()}
    meta = {**meta, "input_shape": [int(size) for size in meta["input_shape"]]}
    path = Path(path)
    torch.save({"format_version": FORMAT_VERSION, "meta": meta, "state_dict": state_dict}, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw content of a checkpoint file: ``format_version``, ``meta`` and ``state_dict``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises several kinds on a file it cannot read
        raise ValueError(f"{path} is not an advorch checkpoint: {err}") from err
    if not isinstance(content, dict) or content.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an advorch checkpoint (format {FORMAT_VERSION})")
    return content


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The meta a checkpoint carries: arch, num_classes, input_shape, spec, best_epoch, ..."""
    meta: dict[str, Any] = read_checkpoint(path)["meta"]
    return meta


# A torch.export program keeps its graph, not the name of the network it was exported from.
UNKNOWN_ARCH = "unknown (torch.export program)"


def model_architecture(path: str | Path) -> str:
    """The architecture of a model file ``load_model`` takes: an advorch checkpoint's ``arch``
    (``preact_resnet18``, ...); UNKNOWN_ARCH for a torch.export program."""
    if model_format(path) == "advorch":
        return str(read_checkpoint_meta(path)["arch"])
    return UNKNOWN_ARCH


def load_checkpoint(path: str | Path) -> nn.Module:
    """The model saved at ``path``, on the CPU, in eval mode, ready to predict."""
    content = read_checkpoint(path)
    meta = content["meta"]
    model = build_model(
        meta["arch"],
        num_classes=meta["num_classes"],
        in_channels=meta["input_shape"][0],
        normalization=Normalization.from_meta(meta.get("normalization")),
    )
    model.load_state_dict(content["state_dict"])
    return model.eval()


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module. The program fixed its train/eval behaviour when it
    was exported (export classifiers in eval mode), and the module ``torch.export`` gives back
    refuses ``.eval()``, so here ``train()``/``eval()`` only set the flag."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.program(x)
        return out

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self


def load_model(path: str | Path) -> nn.Module:
    """Any model file advorch evaluates, on the CPU, in eval mode: an advorch checkpoint or a
    ``torch.export`` program (``.pt2``) of a classifier that maps images in [0, 1] to logits."""
    if model_format(path) == "advorch":
        return load_checkpoint(path)
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # a damaged or foreign archive raises many kinds
        raise ValueError(f"{path} is not a loadable torch.export program: {err}") from err
    return ExportedModel(program.module()).eval()
