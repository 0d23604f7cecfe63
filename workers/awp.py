"""Adversarial Weight Perturbation (Wu, Xia and Wang 2020, "Adversarial Weight Perturbation
Helps Robust Generalization", NeurIPS; official code github.com/csdongxian/AWP).

Each training step, after the inputs have been attacked:

    1. the direction: the gradient of the training loss (PGD-AT's cross-entropy on the
       adversarial batch, or the TRADES loss) with respect to the weights, taken on a *proxy*,
       a copy of the model in train mode, so that its BatchNorm statistics do not move;
    2. the perturbation: for each layer's weight (every parameter of two or more dimensions:
       convolutions and linear layers; biases and BatchNorm are left alone), the direction
       scaled to ``gamma`` times the norm of that weight;
    3. the weights are moved by it, the training loss and its gradient are computed there, the
       weights are put back, and the optimizer steps.

The official code takes one SGD step on the proxy (``proxy_optim``, no momentum or weight
decay) and uses the difference of the weights: that is ``lr`` times the gradient, and the
layer-wise normalisation cancels ``lr``, so step 2 here is the same perturbation. Where it
differs: the official code restores the weights by subtracting the perturbation *after*
``optimizer.step()``, so the step's weight decay sees the perturbed weights and the restore
leaves rounding behind; here the saved weights are copied back *before* the step. The step is
then exactly a step from the unperturbed weights with the gradient taken at the perturbed ones
(the weight decay term differs by ``gamma * weight_decay`` relative, negligible), nothing of
the perturbation is ever left in the weights, and DDP ranks, whose perturbations differ (each
computes its own on its shard), stay in sync, as their gradients are averaged.

The cost: one more forward and backward per step (two forwards for TRADES, clean and
adversarial), on top of the attack's; measured in docs/benchmarks.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# The official code's guard against a zero gradient: ||w|| / (||g|| + EPS) * g.
EPS = 1e-20

LossOf = Callable[[nn.Module], torch.Tensor]


def perturbed_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters AWP perturbs, by name: the weights of two or more dimensions (the
    official ``diff_in_weights`` skips everything of one dimension: biases, BatchNorm)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]


class AdversarialWeightPerturbation:
    """AWP for one model: ``perturbation(model, loss_of)`` computes the weight perturbation of
    a step, ``perturbed(model, perturbation)`` applies it for the step's gradient and puts the
    weights back after. Holds the proxy, a copy of the model loaded from it every step."""

    def __init__(self, model: nn.Module, *, gamma: float) -> None:
        self.gamma = gamma
        self.proxy = copy.deepcopy(model)

    def perturbation(self, model: nn.Module, loss_of: LossOf) -> dict[str, torch.Tensor]:
        """``gamma * ||w|| * g / ||g||`` for each perturbed weight ``w``, where ``g`` is the
        gradient of ``loss_of(proxy)`` at the model's current weights (the direction that raises
        the loss), computed on the proxy in train mode: the model, its gradients and its
        BatchNorm statistics are untouched."""
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train()
        names, weights = zip(*perturbed_parameters(self.proxy), strict=True)
        for p in self.proxy.parameters():
            p.requires_grad_(True)
        grads = torch.autograd.grad(loss_of(self.proxy), weights)
        with torch.no_grad():
            return {
                name: self.gamma * w.norm() / (g.norm() + EPS) * g
                for name, w, g in zip(names, weights, grads, strict=True)
            }


@contextmanager
def perturbed(model: nn.Module, perturbation: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """The model with ``perturbation`` added to its weights; on leaving, the weights are the
    exact values they had before (copies put back, not the perturbation subtracted), whatever
    happened inside. Gradients computed inside stay in ``.grad``: they are the point."""
    parameters = dict(model.named_parameters())
    saved = {name: parameters[name].detach().clone() for name in perturbation}
    with torch.no_grad():
        for name, delta in perturbation.items():
            parameters[name].add_(delta)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                parameters[name].copy_(weight)
