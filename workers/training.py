"""Adversarial training: one step, one epoch, and ``run_training`` for a whole job spec.

    step:   attack the batch (model frozen: eval-mode BN, input gradients only), then one SGD
            step of the training loss on the result, in train mode; with AWP, the gradient is
            taken at adversarially perturbed weights (workers.awp), and an EMA of the weights
            is updated after the step (workers.ema).
    epoch:  a fresh permutation of the device-resident training split, augmented on the
            device, the learning rate set per step from the schedule.
    run:    epochs, validation clean and PGD accuracy after each, and the best epoch by
            validation robust accuracy kept (a copy of its model, and its checkpoint). The test
            split is not touched here: ``workers.evaluate.evaluate_robustness`` attacks the best
            model on it once training is over, so nothing is ever chosen by a test number.

Metrics are accumulated on the device and read back once per epoch, so on CUDA no step
waits for the host.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.attacks import AttackBN, fgsm, mart_attack, pgd_linf, trades_attack
from workers.awp import AdversarialWeightPerturbation, perturbed
from workers.data import (
    AUGMENTATIONS,
    NORMALIZATIONS,
    NUM_CLASSES,
    Augmentation,
    augment,
    load_dataset,
)
from workers.device import default_device, logits_of, memory_format, place_model, unwrap
from workers.ema import WeightAverage
from workers.evaluate import clean_accuracy, robust_accuracy
from workers.losses import mart_loss, trades_loss
from workers.models import build_model, save_checkpoint
from workers.spec import ADVERSARIAL_METHODS, EvaluationSpec, JobSpec, TrainingSpec

log = logging.getLogger(__name__)

Report = Callable[[dict[str, float], Path | None], None]

BEST_CHECKPOINT = "best.pt"
STATE_CHECKPOINT = "state.pt"
# FGSM-RS can overfit catastrophically: PGD accuracy falls to ~0 within an epoch (Wong et al.
# 2020). A fall this large below the best epoch's is logged; the best checkpoint, chosen by
# validation PGD accuracy, is the fallback, so the run's result comes from before the fall.
COLLAPSE_DROP = 0.2


def adversarial_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str,
    epsilon: float,
    step_size: float,
    steps: int,
    beta: float = 6.0,
    attack_bn: AttackBN = "eval",
    awp: AdversarialWeightPerturbation | None = None,
    ema: WeightAverage | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step of ``method`` on the batch ``(x, y)``; leaves the model in train mode.

    ``method``: ``standard`` (clean inputs), ``pgd_at`` (PGD-``steps`` from a uniform random
    start, Madry et al.), ``trades`` (the KL attack and the TRADES loss with ``beta``),
    ``fgsm_rs`` (one FGSM step of ``step_size`` from a uniform random start, Wong et al.) or
    ``mart`` (PGD on the cross-entropy from the TRADES start and the MART loss with ``beta``,
    Wang et al. 2020).
    ``attack_bn``: BatchNorm's mode while the attack runs (see ``workers.attacks``).
    ``awp``: when given, the gradient of the step is taken at the weights perturbed by AWP
    (Wu et al. 2020), and the step applied to the unperturbed weights (``workers.awp``).
    ``ema``: when given, updated after the step (``workers.ema``).
    Returns 0-dim tensors on the device, not floats, so that no step waits for the host:
    ``loss`` and ``acc`` (accuracy on the inputs trained on: adversarial ones, or clean ones
    for ``standard``).

    The attack runs on the plain module even when ``model`` is DistributedDataParallel:
    attacking is per example and needs no gradient synchronisation.
    """
    attacked = unwrap(model)
    if method == "standard":
        x_train = x
    elif method == "pgd_at":
        x_train = pgd_linf(
            attacked, x, y, epsilon=epsilon, step_size=step_size, steps=steps, attack_bn=attack_bn
        )
    elif method == "fgsm_rs":
        x_train = fgsm(
            attacked,
            x,
            y,
            epsilon=epsilon,
            step_size=step_size,
            random_start=True,
            attack_bn=attack_bn,
        )
    elif method == "trades":
        x_train = trades_attack(
            attacked, x, epsilon=epsilon, step_size=step_size, steps=steps, attack_bn=attack_bn
        )
    elif method == "mart":
        x_train = mart_attack(
            attacked, x, y, epsilon=epsilon, step_size=step_size, steps=steps, attack_bn=attack_bn
        )
    else:
        raise ValueError(f"unknown method {method!r}")

    def loss_of(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of ``net`` on the batch, and the logits of the inputs trained on."""
        if method in ("trades", "mart"):
            logits_clean = logits_of(net, x)  # clean first, as the official code does
            logits = logits_of(net, x_train)
            objective = trades_loss if method == "trades" else mart_loss
            return objective(logits_clean, logits, y, beta=beta), logits
        logits = logits_of(net, x_train)
        return F.cross_entropy(logits, y), logits

    model.train()
    perturbation = (
        awp.perturbation(attacked, lambda proxy: loss_of(proxy)[0]) if awp is not None else {}
    )
    optimizer.zero_grad(set_to_none=True)
    # With AWP, the loss and its gradient at the perturbed weights; the weights are back to
    # their exact values before the optimizer steps (workers.awp).
    with perturbed(attacked, perturbation):
        loss, logits = loss_of(model)
        loss.backward()
    optimizer.step()
    if ema is not None:
        ema.update(attacked)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == y).float().mean()
    return {"loss": loss.detach(), "acc": accuracy}


def learning_rate(schedule: str, base_lr: float, progress: float) -> float:
    """The learning rate at ``progress`` (the fraction of all training steps done, in [0, 1)).

    ``cosine`` anneals to 0; ``piecewise`` is Rice et al.'s x0.1 at 50% and again at 75%;
    ``constant`` stays at ``base_lr``.
    """
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "piecewise":
        return base_lr * (1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown lr schedule {schedule!r}")


def warmup_scale(step: int, warmup_steps: int) -> float:
    """The fraction of the training epsilon (and of its step size) used at ``step`` (0-based,
    counted over the whole run) during a warm-up of ``warmup_steps`` steps: a linear ramp,
    ``step / warmup_steps``, from 0 at the first step to 1 from the first step after the
    warm-up on (``training.epsilon_warmup_epochs`` times the steps per epoch)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    training: TrainingSpec,
    augmentation: Augmentation,
    batch_size: int,
    steps: int,
    first_step: int,
    total_steps: int,
    epsilon_warmup_steps: int = 0,
    awp: AdversarialWeightPerturbation | None = None,
    ema: WeightAverage | None = None,
) -> dict[str, float]:
    """``steps`` training steps on random batches of the device-resident ``(x, y)``; the
    training epsilon and its step size ramped over the first ``epsilon_warmup_steps`` steps of
    the run (``warmup_scale``); AWP (when given) at every step, the EMA (when given) updated
    after each.

    Returns ``train_loss`` and ``train_acc`` (means over the examples seen), ``lr`` (the
    learning rate of the epoch's last step) and ``train_epsilon`` (its training epsilon).
    """
    order = torch.randperm(len(x), device=x.device)
    loss_sum = torch.zeros((), device=x.device)
    correct_sum = torch.zeros((), device=x.device)
    seen = 0
    lr = training.optimizer.lr
    epsilon = training.epsilon
    for step in range(steps):
        lr = learning_rate(
            training.lr_schedule, training.optimizer.lr, (first_step + step) / total_steps
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        scale = warmup_scale(first_step + step, epsilon_warmup_steps)
        epsilon = training.epsilon * scale
        batch = order[step * batch_size : (step + 1) * batch_size]
        xb = augment(x[batch], augmentation).contiguous(memory_format=memory_format(x.device))
        out = adversarial_train_step(
            model,
            optimizer,
            xb,
            y[batch],
            method=training.method,
            epsilon=epsilon,
            step_size=_resolved(training.step_size) * scale,
            steps=int(_resolved(training.attack_steps)),
            beta=training.beta if training.beta is not None else 0.0,
            attack_bn=training.attack_bn,
            awp=awp,
            ema=ema,
        )
        loss_sum += out["loss"] * len(batch)
        correct_sum += out["acc"] * len(batch)
        seen += len(batch)
    return {
        "train_loss": loss_sum.item() / seen,
        "train_acc": correct_sum.item() / seen,
        "lr": lr,
        # What the inputs trained on were attacked at (standard: none, clean inputs).
        "train_epsilon": epsilon if training.method in ADVERSARIAL_METHODS else 0.0,
    }


def validate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, evaluation: EvaluationSpec
) -> dict[str, float]:
    """``val_clean_acc`` and ``val_robust_acc`` (PGD at the job's evaluation settings)."""
    return {
        "val_clean_acc": clean_accuracy(model, x, y),
        "val_robust_acc": robust_accuracy(model, x, y, **pgd_settings(evaluation)),
    }


def pgd_settings(evaluation: EvaluationSpec) -> dict[str, Any]:
    """The keyword arguments of ``robust_accuracy`` that a job's evaluation spec fixes."""
    return {
        "epsilon": _resolved(evaluation.epsilon),
        "step_size": _resolved(evaluation.step_size),
        "steps": evaluation.attack_steps,
        "restarts": evaluation.restarts,
    }


# What a run's validation, best epoch, checkpoint and test numbers are of: the trained weights,
# or their exponential moving average (training.ema).
TRAINED_WEIGHTS = "trained"
EMA_WEIGHTS = "ema"


@dataclass
class TrainingResult:
    """What a run leaves: its best epoch by validation robust accuracy, that epoch's metrics,
    on rank 0 a copy of that epoch's model (in eval mode; None on other ranks), and which
    weights that model is (``TRAINED_WEIGHTS`` or ``EMA_WEIGHTS``)."""

    best_epoch: int
    best_metrics: dict[str, float]
    best_model: nn.Module | None
    weights: str = TRAINED_WEIGHTS


def evaluated_model(model: nn.Module, ema: WeightAverage | None) -> nn.Module:
    """The model a run validates, keeps as its best and evaluates on the test split: the EMA of
    the weights when the spec has one (as Gowal et al. and Rebuffi et al. evaluate), else the
    trained model itself."""
    return ema.model if ema is not None else model


def run_training(
    spec: JobSpec,
    report: Report,
    *,
    device: torch.device | None = None,
    data_root: Path | None = None,
    resume_from: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainingResult:
    """Train ``spec`` (its dataset, model, training and evaluation parts) epoch by epoch.

    After every epoch, every rank calls ``report(metrics, checkpoint_dir)``: ``metrics`` has
    ``epoch`` (1-based), ``train_loss``, ``train_acc``, ``lr``, ``train_epsilon`` (the
    training epsilon of the epoch's last step, below the spec's during a warm-up),
    ``epoch_seconds`` and ``images_per_second`` (all ranks together), and on rank 0
    ``val_clean_acc``, ``val_robust_acc`` and ``best_epoch`` (the best so far). With
    ``training.ema`` the validation, the best epoch and ``best.pt`` are of the EMA model
    (``evaluated_model``), and the result's ``weights`` says so. On rank 0 ``checkpoint_dir`` is
    a fresh temporary directory holding ``best.pt`` (the best model so far by validation
    robust accuracy, for ``load_checkpoint``) and ``state.pt`` (what ``resume_from`` needs to
    continue after this epoch); it is removed after ``report`` returns, so ``report`` copies or
    moves it to keep it. Other ranks get ``None``.

    With ``world_size`` > 1 each rank trains on ``x[rank::world_size]`` with a batch of
    ``batch_size // world_size``, so the global batch and the steps per epoch stay the
    spec's; ``wrap_model`` (e.g. ``ray.train.torch.prepare_model``) makes the model
    DistributedDataParallel. Rank 0 validates alone, on the plain module.

    Returns the best epoch, its validation metrics and (rank 0) its model; evaluate that on
    the test split with ``workers.evaluate.evaluate_robustness``. Runs with the same
    ``training.seed`` give the same metrics on the CPU, resumed or not.
    """
    device = device or default_device()
    training = spec.training
    torch.manual_seed(training.seed)
    fmt = memory_format(device)

    x_train, y_train = load_dataset(spec.dataset.name, "train", data_root)
    steps_per_epoch, batch_size = _steps_and_batch(len(x_train), training.batch_size, world_size)
    x_train = x_train[rank::world_size].to(device, memory_format=fmt)
    y_train = y_train[rank::world_size].to(device)
    input_shape = tuple(x_train.shape[1:])

    normalization = NORMALIZATIONS[spec.dataset.name] if spec.model.normalize else None
    model = build_model(
        spec.model.arch,
        num_classes=NUM_CLASSES[spec.dataset.name],
        in_channels=input_shape[0],
        normalization=normalization,
    )
    model = place_model(model, device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=training.optimizer.lr,
        momentum=training.optimizer.momentum,
        weight_decay=training.optimizer.weight_decay,
    )
    best = Best()
    # Built from the plain module before DDP wraps it: AWP's proxy is a plain copy, and the
    # average follows the plain module's weights (the same tensors DDP trains).
    awp = (
        AdversarialWeightPerturbation(model, gamma=training.awp.gamma)
        if training.awp is not None and training.awp.gamma > 0
        else None
    )
    ema = (
        WeightAverage(model, decay=training.ema.decay, warmup_steps=training.ema.warmup_steps)
        if training.ema is not None
        else None
    )
    weights = EMA_WEIGHTS if ema is not None else TRAINED_WEIGHTS
    start_epoch, step = 0, 0
    if resume_from is not None:
        start_epoch, step = _resume(
            Path(resume_from) / STATE_CHECKPOINT, model, optimizer, best, ema
        )
        log.warning("resuming after epoch %d from %s", start_epoch, resume_from)
    trained = wrap_model(model) if wrap_model is not None else model

    if rank == 0:
        x_val, y_val = load_dataset(spec.dataset.name, "val", data_root)
        x_val, y_val = x_val.to(device, memory_format=fmt), y_val.to(device)
    meta = {
        "arch": spec.model.arch,
        "num_classes": NUM_CLASSES[spec.dataset.name],
        "input_shape": input_shape,
        "normalization": normalization.as_meta() if normalization is not None else None,
        "spec": spec.model_dump(mode="json"),
        "weights": weights,
    }

    total_steps = training.epochs * steps_per_epoch
    epsilon_warmup_steps = training.epsilon_warmup_epochs * steps_per_epoch
    awp_warmup_epochs = training.awp.warmup_epochs if training.awp is not None else 0
    for epoch in range(start_epoch + 1, training.epochs + 1):
        started = time.perf_counter()
        metrics: dict[str, float] = {"epoch": epoch}
        metrics |= train_one_epoch(
            trained,
            optimizer,
            x_train,
            y_train,
            training=training,
            augmentation=AUGMENTATIONS[spec.dataset.name],
            batch_size=batch_size,
            steps=steps_per_epoch,
            first_step=step,
            total_steps=total_steps,
            epsilon_warmup_steps=epsilon_warmup_steps,
            # The official code's --awp-warmup: the first epochs train without AWP.
            awp=awp if epoch > awp_warmup_epochs else None,
            ema=ema,
        )
        step += steps_per_epoch
        train_seconds = time.perf_counter() - started
        images = min(steps_per_epoch * batch_size, len(x_train)) * world_size
        metrics["images_per_second"] = images / train_seconds
        if rank != 0:
            metrics["epoch_seconds"] = time.perf_counter() - started
            report(metrics, None)
            continue

        evaluated = evaluated_model(model, ema)
        metrics |= validate(evaluated, x_val, y_val, spec.evaluation)
        metrics["epoch_seconds"] = time.perf_counter() - started
        best.update(epoch, metrics, evaluated)
        metrics["best_epoch"] = best.epoch
        if best.metrics["val_robust_acc"] - metrics["val_robust_acc"] > COLLAPSE_DROP:
            log.warning(
                "epoch %d: validation robust accuracy fell from %.3f (epoch %d) to %.3f; "
                "the best checkpoint stays epoch %d",
                epoch,
                best.metrics["val_robust_acc"],
                best.epoch,
                metrics["val_robust_acc"],
                best.epoch,
            )
        log.info("epoch %d: %s", epoch, metrics)
        with tempfile.TemporaryDirectory(prefix="advorch-ckpt-", ignore_cleanup_errors=True) as d:
            checkpoint_dir = Path(d)
            best.save(checkpoint_dir / BEST_CHECKPOINT, meta)
            _save_state(checkpoint_dir / STATE_CHECKPOINT, epoch, step, model, optimizer, best, ema)
            report(metrics, checkpoint_dir)

    if rank != 0:
        return TrainingResult(best_epoch=0, best_metrics={}, best_model=None)
    assert best.model is not None, "rank 0 validated every epoch"
    return TrainingResult(
        best_epoch=best.epoch,
        best_metrics=dict(best.metrics),
        best_model=best.model.eval(),
        weights=weights,
    )


class Best:
    """The best epoch so far by validation robust accuracy: its number, metrics and a copy of
    its model (the first of equals wins)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.metrics: dict[str, float] = {}
        self.model: nn.Module | None = None

    def update(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> None:
        if self.model is not None and metrics["val_robust_acc"] <= self.metrics["val_robust_acc"]:
            return
        self.epoch, self.metrics = epoch, dict(metrics)
        if self.model is None:
            self.model = copy.deepcopy(model)
        else:
            self.model.load_state_dict(model.state_dict())

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        assert self.model is not None, "no epoch has been validated yet"
        meta = {**meta, "best_epoch": self.epoch, "metrics": self.metrics}
        save_checkpoint(path, self.model, meta)


def _save_state(
    path: Path,
    epoch: int,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    best: Best,
    ema: WeightAverage | None = None,
) -> None:
    """Everything ``_resume`` needs to continue exactly where this epoch ended."""
    assert best.model is not None
    device = next(model.parameters()).device
    torch.save(
        {
            "epoch": epoch,
            "step": step,  # the position in the LR schedule
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_epoch": best.epoch,
            "best_metrics": best.metrics,
            "best_model": best.model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        },
        path,
    )


def _resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    best: Best,
    ema: WeightAverage | None = None,
) -> tuple[int, int]:
    """Load a ``state.pt`` into ``model``, ``optimizer``, ``best``, ``ema`` and the RNGs;
    returns the epoch it ended and its step."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        assert state.get("ema") is not None, "a state of a run with EMA has the average"
        ema.load_state_dict(state["ema"])
    best.epoch, best.metrics = state["best_epoch"], state["best_metrics"]
    best.model = copy.deepcopy(evaluated_model(model, ema))
    best.model.load_state_dict(state["best_model"])
    torch.set_rng_state(state["cpu_rng"])
    device = next(model.parameters()).device
    if state["cuda_rng"] is not None and device.type == "cuda":  # GPU only
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["epoch"], state["step"]


def _steps_and_batch(num_examples: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """Steps per epoch and the per-rank batch size. Every rank takes the same number of steps
    (DDP needs it), set by the smallest shard; incomplete last batches are dropped (a batch of
    one would break BatchNorm), except that an epoch has at least one step."""
    per_rank_batch = max(1, batch_size // world_size)
    smallest_shard = num_examples // world_size
    return max(1, smallest_shard // per_rank_batch), per_rank_batch


def _resolved(value: float | None) -> float:
    """A spec field that JobSpec's validators always fill (step sizes, the eval epsilon)."""
    assert value is not None, "JobSpec resolves this field; build specs with JobSpec"
    return value
