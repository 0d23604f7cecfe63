"""The training objectives beyond plain cross-entropy.

TRADES (Zhang et al. 2019): cross-entropy on clean inputs plus beta times the KL divergence
    between the model's predictions on clean and on adversarial inputs.
MART (Wang et al. 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified
    Examples", official code github.com/YisenWang/MART): boosted cross-entropy on the
    adversarial example plus beta times the KL term weighted by how wrong the clean
    prediction is, 1 - p_y(clean).
"""

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


# The official MART code's guards, kept so that the loss is the same number: the margin term's
# log(1.0001 - p + 1e-12), the KL's log(p_adv + 1e-12) and the weight 1.0000001 - p_y.
_MART_MARGIN = 1.0001
_MART_LOG_EPS = 1e-12
_MART_WEIGHT = 1.0000001


def mart_loss(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """The MART loss as the official ``mart.py`` computes it, averaged over the batch:

        BCE(f(x_adv), y) + beta * KL(f(x) || f(x_adv)) * (1 - f(x)_y)

    where BCE is the boosted cross-entropy: CE(f(x_adv), y) - log(1 - max_{k != y} f(x_adv)_k),
    the second term pushing down the most likely wrong class. The gradient flows through both
    predictions, and through the weight 1 - f(x)_y, as in the official code.
    """
    adv_probs = F.softmax(logits_adv, dim=1)
    # The most likely class other than y (the official code's argsort of the top two).
    top2 = torch.topk(adv_probs, 2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(
        torch.log(_MART_MARGIN - adv_probs + _MART_LOG_EPS), wrong
    )
    nat_probs = F.softmax(logits_clean, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl_per_example = F.kl_div(
        torch.log(adv_probs + _MART_LOG_EPS), nat_probs, reduction="none"
    ).sum(dim=1)
    robust = (kl_per_example * (_MART_WEIGHT - true_probs)).mean()
    return boosted_ce + beta * robust
