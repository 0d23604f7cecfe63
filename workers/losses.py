"""The TRADES objective (Zhang et al. 2019): cross-entropy on clean inputs plus beta times the
KL divergence between the model's predictions on clean and on adversarial inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(
    logits_p: torch.Tensor, logits_q: torch.Tensor, *, reduction: str = "batchmean"
) -> torch.Tensor:
    """KL(p || q) between the softmax distributions of two sets of logits, summed over
    classes and reduced over the batch (``batchmean``: the per-example mean; ``sum``)."""
    return F.kl_div(F.log_softmax(logits_q, dim=1), F.softmax(logits_p, dim=1), reduction=reduction)


def trades_loss(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """CE(f(x), y) + beta * KL(f(x) || f(x_adv)), both averaged over the batch.

    As in the official code, the gradient flows through both the clean and the adversarial
    predictions of the KL term.
    """
    natural = F.cross_entropy(logits_clean, y)
    return natural + beta * kl_divergence(logits_clean, logits_adv)
