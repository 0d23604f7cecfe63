"""A data set's normalisation as the model's first layer.

Attacks, epsilons and AutoAttack all work on pixels in [0, 1]; a model trained on normalised
inputs takes those pixels and normalises them itself, so an L-inf ball of 8/255 means 8/255 of
a pixel, as the field reports it, whatever the model does inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of a data set's pixels in [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_meta(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: dict[str, Sequence[float]] | None) -> Normalization | None:
        return None if meta is None else cls(tuple(meta["mean"]), tuple(meta["std"]))


class Normalized(nn.Module):
    """``net((x - mean) / std)``: the network behind its input normalisation."""

    def __init__(self, net: nn.Module, normalization: Normalization) -> None:
        super().__init__()
        if len(normalization.mean) != len(normalization.std):
            raise ValueError("normalization needs one mean and one std per channel")
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(normalization.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std).view(1, -1, 1, 1))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((x - self.mean) / self.std)
        return out
