"""An exponential moving average (EMA) of a model's weights, the weight averaging of Gowal et
al. 2020 ("Uncovering the Limits of Adversarial Training against Norm-Bounded Adversarial
Examples") and Rebuffi et al. 2021 ("Fixing Data Augmentation to Improve Adversarial
Robustness"), who evaluate the averaged model, not the trained one.

After every optimizer step:

    avg <- decay * avg + (1 - decay) * weights      (decay 0 for the first ``warmup_steps``)

so that after k steps at a fixed decay d from a start w_0,
avg_k = d^k w_0 + (1 - d) * sum_{i=1..k} d^(k-i) w_i. Buffers (BatchNorm's running mean,
variance and batch count, a normalisation layer's constants) are not averaged but copied: the
running statistics are already averages, of the trained weights' activations, and copying them
is what Gowal et al.'s and timm's EMA do.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The EMA of ``model``'s weights: ``model`` here is a copy, in eval mode, with no gradients,
    updated by ``update(trained)`` after each optimizer step of the trained model."""

    def __init__(self, model: nn.Module, *, decay: float, warmup_steps: int = 0) -> None:
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay of the ``step``-th update (1-based): 0 during the warm-up (the average is
        the weights), then ``decay``."""
        return 0.0 if step <= self.warmup_steps else self.decay

    @torch.no_grad()
    def update(self, trained: nn.Module) -> None:
        self.steps += 1
        decay = self.decay_at(self.steps)
        for avg, weight in zip(self.model.parameters(), trained.parameters(), strict=True):
            avg.mul_(decay).add_(weight.detach(), alpha=1 - decay)
        for avg_buffer, buffer in zip(self.model.buffers(), trained.buffers(), strict=True):
            avg_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.model.load_state_dict(state["model"])
