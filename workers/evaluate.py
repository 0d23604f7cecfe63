"""Clean, PGD and AutoAttack accuracy, as the field reports them: model in eval mode, fp32 on
every device, batched, counted on the device and read back once.

``evaluate_robustness`` is the evaluation of a model on the test split at one epsilon: what a
trial reports at the end (at the job's evaluation epsilon) and what an evaluate job reports at
each epsilon of its curve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.attacks import frozen, pgd_linf
from workers.autoattack import AutoAttackResult, OnAttack, run_autoattack
from workers.device import full_precision, logits_of
from workers.spec import EvaluationSpec

EVAL_BATCH_SIZE = 512


def clean_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = EVAL_BATCH_SIZE
) -> float:
    """The fraction of ``x`` the model classifies correctly."""
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with frozen(model), full_precision(), torch.no_grad():
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
    with frozen(model), full_precision():
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            x_adv = pgd_linf(
                model, xb, yb, epsilon=epsilon, step_size=step_size, steps=steps, restarts=restarts
            )
            with torch.no_grad():
                correct += (logits_of(model, x_adv).argmax(dim=1) == yb).sum()
    return correct.item() / len(x)


@dataclass
class RobustnessResult:
    """A model's accuracy at one epsilon: clean, under PGD, and under AutoAttack when asked."""

    epsilon: float
    clean_acc: float
    robust_acc: float
    autoattack: AutoAttackResult | None = None


def evaluate_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    evaluation: EvaluationSpec,
    *,
    epsilon: float,
    seed: int,
    autoattack_state: Path | None = None,
    on_attack: OnAttack | None = None,
    on_pgd: Callable[[RobustnessResult], None] | None = None,
) -> RobustnessResult:
    """Clean accuracy and PGD (the evaluation's steps and restarts, its step-size ratio) at
    ``epsilon`` on all of ``(x, y)``; then, when the evaluation asks for it, AutoAttack on its
    first ``autoattack_examples`` points (``autoattack_state`` and ``on_attack``: see
    ``run_autoattack``). ``on_pgd`` is told the PGD result before AutoAttack starts."""
    result = RobustnessResult(
        epsilon=epsilon,
        clean_acc=clean_accuracy(model, x, y),
        robust_acc=robust_accuracy(
            model,
            x,
            y,
            epsilon=epsilon,
            step_size=evaluation.step_size_at(epsilon),
            steps=evaluation.attack_steps,
            restarts=evaluation.restarts,
        ),
    )
    if evaluation.autoattack:
        if on_pgd is not None:
            on_pgd(result)
        examples = evaluation.autoattack_examples or len(x)
        result.autoattack = run_autoattack(
            model,
            x[:examples],
            y[:examples],
            epsilon=epsilon,
            seed=seed,
            state_path=autoattack_state,
            on_attack=on_attack,
        )
    return result
