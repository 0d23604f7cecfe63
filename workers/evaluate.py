"""Clean and PGD robust accuracy, as the field reports them: model in eval mode, batched,
counted on the device and read back once."""

from __future__ import annotations

import torch
from torch import nn

from workers.attacks import frozen, pgd_linf
from workers.device import logits_of

EVAL_BATCH_SIZE = 512


def clean_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = EVAL_BATCH_SIZE
) -> float:
    """The fraction of ``x`` the model classifies correctly."""
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with frozen(model), torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            correct += (logits_of(model, xb).argmax(dim=1) == yb).sum()
    return correct.item() / len(x)


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int = 20,
    restarts: int = 1,
    batch_size: int = EVAL_BATCH_SIZE,
) -> float:
    """The fraction of ``x`` still classified correctly under PGD-``steps`` (random start,
    ``restarts`` runs) at L-inf radius ``epsilon``."""
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with frozen(model):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            x_adv = pgd_linf(
                model, xb, yb, epsilon=epsilon, step_size=step_size, steps=steps, restarts=restarts
            )
            with torch.no_grad():
                correct += (logits_of(model, x_adv).argmax(dim=1) == yb).sum()
    return correct.item() / len(x)
