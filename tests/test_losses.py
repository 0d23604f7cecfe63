"""The MART loss (Wang et al. 2020) against its formula, computed by hand on fixed logits, and
MART's attack."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workers.attacks import mart_attack
from workers.data import load_dataset
from workers.losses import mart_loss
from workers.models import build_model

LOGITS_CLEAN = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -0.5], [1.0, 1.0, 1.0, 1.0]]
# Example 0: the adversarial top class is y (so the boosted term takes the second); 1 and 2:
# it is another class.
LOGITS_ADV = [[1.5, 1.2, -0.5, 0.3], [2.5, 0.0, 1.0, -1.0], [0.0, 0.3, 2.0, -2.0]]
LABELS = [0, 2, 1]


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def mart_by_hand(beta: float) -> float:
    """The official mart.py, one example at a time in plain floats:
    CE(adv) - log(1.0001 - max_{k != y} p_adv_k + 1e-12)
    + beta * sum_k p_nat_k (log p_nat_k - log(p_adv_k + 1e-12)) * (1.0000001 - p_nat_y)."""
    total = 0.0
    for clean, adv, y in zip(LOGITS_CLEAN, LOGITS_ADV, LABELS, strict=True):
        p_nat, p_adv = softmax(clean), softmax(adv)
        wrong = max((k for k in range(4) if k != y), key=lambda k: p_adv[k])
        boosted = -math.log(p_adv[y]) - math.log(1.0001 - p_adv[wrong] + 1e-12)
        kl = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(p_nat, p_adv, strict=True))
        total += boosted + beta * kl * (1.0000001 - p_nat[y])
    return total / len(LABELS)


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_mart_loss_equals_its_formula_on_fixed_logits(beta: float) -> None:
    clean = torch.tensor(LOGITS_CLEAN, dtype=torch.float64)
    adv = torch.tensor(LOGITS_ADV, dtype=torch.float64)
    y = torch.tensor(LABELS)
    loss = mart_loss(clean, adv, y, beta=beta)
    assert loss.item() == pytest.approx(mart_by_hand(beta), rel=1e-12, abs=1e-12)


def test_mart_loss_is_not_trades_and_its_gradient_reaches_both_predictions() -> None:
    clean = torch.tensor(LOGITS_CLEAN, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor(LOGITS_ADV, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(LABELS)
    loss = mart_loss(clean, adv, y, beta=6.0)
    # Not plain cross-entropy on the adversarial example: the boosted term adds to it.
    assert loss.item() > F.cross_entropy(adv, y).item() + 0.1
    loss.backward()
    assert clean.grad is not None and clean.grad.abs().sum() > 0
    assert adv.grad is not None and adv.grad.abs().sum() > 0


def test_mart_attack_raises_the_cross_entropy_inside_the_ball() -> None:
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    x, y = x[:64], y[:64]
    model = build_model("small_cnn", in_channels=1).eval()
    x_adv = mart_attack(model, x, y, epsilon=0.1, step_size=0.025, steps=5)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
