"""L-inf attacks on inputs in [0, 1]: PGD, FGSM (and FGSM-RS) and the TRADES inner maximisation.

Every attack runs inside ``frozen(model)``: no parameter requires a gradient, so each attack
step computes the gradient with respect to the input only (``torch.autograd.grad``), never the
weight gradients a ``loss.backward()`` would. That is most of the speed-up over the textbook
loop. BatchNorm is in eval mode by default (``attack_bn="eval"``: the attack uses the running
statistics and does not move them, as the TRADES code does); ``attack_bn="train"`` leaves the
model in train mode, batch statistics and running-statistics updates included, as Rice et al.'s
and Wong et al.'s scripts attack. Evaluation always attacks in eval mode. The model leaves an
attack in the mode it came in, with no ``.grad``; in eval mode its buffers are untouched too.
No attack step reads a value back to the host, so on CUDA the steps queue without waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workers.device import logits_of
from workers.losses import kl_divergence

TRADES_START_STD = 0.001  # the official TRADES start: x + 0.001 * N(0, 1)

AttackBN = Literal["eval", "train"]


@contextmanager
def frozen(model: nn.Module, attack_bn: AttackBN = "eval") -> Iterator[nn.Module]:
    """The model with every parameter's ``requires_grad`` off, in eval mode (or train mode, for
    ``attack_bn="train"``); both restored after."""
    was_training = model.training
    parameters = list(model.parameters())
    required_grad = [p.requires_grad for p in parameters]
    model.train(attack_bn == "train")
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for p, flag in zip(parameters, required_grad, strict=True):
            p.requires_grad_(flag)


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    restarts: int = 1,
    attack_bn: AttackBN = "eval",
) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy (Madry et al. 2018) in the L-inf ball
    of radius ``epsilon`` around ``x``, clipped to [0, 1].

    With ``restarts`` > 1 the attack runs again from new random starts and keeps, per example,
    the first adversarial input found (the first run's result where none is found), so more
    restarts never make the attack weaker.
    """
    x, y = x.detach(), y.detach()

    def run() -> torch.Tensor:
        start = _pgd_start(x, epsilon, random_start)
        return _cross_entropy_ascent(
            model, x, y, start, epsilon=epsilon, step_size=step_size, steps=steps
        )

    with frozen(model, attack_bn):
        x_best = run()
        if restarts > 1:
            fooled = _misclassified(model, x_best, y)
            for _ in range(restarts - 1):
                x_adv = run()
                newly_fooled = _misclassified(model, x_adv, y) & ~fooled
                x_best = torch.where(_per_example(newly_fooled, x), x_adv, x_best)
                fooled |= newly_fooled
    return x_best


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    step_size: float | None = None,
    random_start: bool = False,
    attack_bn: AttackBN = "eval",
) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): one signed-gradient step of ``epsilon`` from ``x``.

    With ``random_start``, FGSM-RS (Wong et al. 2020): one step of ``step_size`` (they use
    1.25 * epsilon) from a uniform point in the ball, projected back onto it.
    """
    return pgd_linf(
        model,
        x,
        y,
        epsilon=epsilon,
        step_size=epsilon if step_size is None else step_size,
        steps=1,
        random_start=random_start,
        attack_bn=attack_bn,
    )


def trades_attack(
    model: nn.Module,
    x: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    attack_bn: AttackBN = "eval",
) -> torch.Tensor:
    """The TRADES inner maximisation: PGD on KL(f(x) || f(x_adv)) from x + 0.001 * N(0, 1).

    It needs no labels: it moves the prediction away from the model's own clean prediction.
    """
    x = x.detach()
    with frozen(model, attack_bn):
        with torch.no_grad():
            logits_clean = logits_of(model, x)
        start = _project(x + TRADES_START_STD * torch.randn_like(x), x, epsilon)
        return _signed_ascent(
            model,
            lambda logits: kl_divergence(logits_clean, logits, reduction="sum"),
            x,
            start,
            epsilon=epsilon,
            step_size=step_size,
            steps=steps,
        )


def mart_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    attack_bn: AttackBN = "eval",
) -> torch.Tensor:
    """MART's attack (Wang et al. 2020, the official ``mart.py``): PGD on the cross-entropy from
    x + 0.001 * N(0, 1), the TRADES start, rather than PGD-AT's uniform start in the ball."""
    x, y = x.detach(), y.detach()
    with frozen(model, attack_bn):
        start = _project(x + TRADES_START_STD * torch.randn_like(x), x, epsilon)
        return _cross_entropy_ascent(
            model, x, y, start, epsilon=epsilon, step_size=step_size, steps=steps
        )


def _pgd_start(x: torch.Tensor, epsilon: float, random_start: bool) -> torch.Tensor:
    """PGD-AT's start: uniform in the ball (clipped to [0, 1]), or ``x`` itself."""
    if random_start:
        return _project(x + torch.empty_like(x).uniform_(-epsilon, epsilon), x, epsilon)
    return x.clone()


def _cross_entropy_ascent(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
) -> torch.Tensor:
    """The ascent of PGD-AT's and MART's attacks, from ``start``: the summed cross-entropy."""
    return _signed_ascent(
        model,
        lambda logits: F.cross_entropy(logits, y, reduction="sum"),
        x,
        start,
        epsilon=epsilon,
        step_size=step_size,
        steps=steps,
    )


def _signed_ascent(
    model: nn.Module,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    start: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
) -> torch.Tensor:
    """``steps`` of projected signed-gradient ascent on ``loss_of(logits)`` from ``start``, in
    the L-inf ball of ``epsilon`` around ``x``: the loop every attack here runs.

    Losses are sums, not means: the same sign, and gradients that do not shrink with the batch.
    """
    x_adv = start
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():  # attacks work under a caller's no_grad() too
            (grad,) = torch.autograd.grad(loss_of(logits_of(model, x_adv)), x_adv)
        x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, epsilon)
    return x_adv


def _project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The nearest point to ``x_adv`` in the L-inf ball around ``x`` and in [0, 1]."""
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - epsilon), x + epsilon), 0, 1)


def _misclassified(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(model, x).argmax(dim=1) != y


def _per_example(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example boolean mask shaped to broadcast over ``like``'s other dimensions."""
    return mask.view(-1, *[1] * (like.dim() - 1))
