"""Adversarial Weight Perturbation (workers.awp): a step equals a plain SGD step with the
gradient taken at the perturbed weights, computed here by hand on a linear model, and nothing
of the perturbation is ever left in the weights, the checkpoint or the BatchNorm statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from workers.attacks import pgd_linf
from workers.awp import AdversarialWeightPerturbation, perturbed, perturbed_parameters
from workers.models import load_checkpoint
from workers.spec import JobSpec
from workers.training import BEST_CHECKPOINT, STATE_CHECKPOINT, adversarial_train_step, run_training

GAMMA = 0.05
LR = 0.5


def tiny() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.rand(6, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, x, y


def ce_gradients(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: the mean cross-entropy of softmax(x W^T + b) has the gradients
    (P - Y)^T x / n for W and mean(P - Y) for b, P the probabilities and Y the one-hot labels."""
    flat = x.reshape(len(x), -1)
    logits = flat @ w.T + b
    probs = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    probs = probs / probs.sum(dim=1, keepdim=True)
    residual = probs - torch.eye(w.shape[0], dtype=w.dtype)[y]
    return residual.T @ flat / len(x), residual.mean(dim=0)


@pytest.mark.parametrize("method", ["standard", "pgd_at"])
def test_an_awp_step_is_sgd_with_the_gradient_at_the_perturbed_weights(method: str) -> None:
    model, x, y = tiny()
    linear = model[1]
    assert isinstance(linear, nn.Linear)
    w, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    # The inputs the step trains on: the batch itself, or PGD's attack from the same RNG state.
    torch.manual_seed(7)
    x_train = (
        pgd_linf(model, x, y, epsilon=0.1, step_size=0.05, steps=2) if method == "pgd_at" else x
    )

    # By hand: the ascent direction at W, scaled to gamma * ||W||; the bias is not perturbed.
    g_w, _ = ce_gradients(w, b, x_train, y)
    w_perturbed = w + GAMMA * w.norm() * g_w / g_w.norm()
    g_w_at, g_b_at = ce_gradients(w_perturbed, b, x_train, y)
    expected_w, expected_b = w - LR * g_w_at, b - LR * g_b_at
    plain_w = w - LR * ce_gradients(w, b, x_train, y)[0]

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    awp = AdversarialWeightPerturbation(model, gamma=GAMMA)
    torch.manual_seed(7)
    adversarial_train_step(
        model, optimizer, x, y, method=method, epsilon=0.1, step_size=0.05, steps=2, awp=awp
    )

    # The model is float64, but logits_of returns float32 logits: agreement to ~1e-8.
    torch.testing.assert_close(linear.weight.detach(), expected_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(linear.bias.detach(), expected_b, rtol=1e-6, atol=1e-7)
    # Not vacuous: the step differs from the plain step by far more than the tolerance.
    assert (expected_w - plain_w).abs().max() > 1e-4


def test_the_awp_direction_is_the_loss_gradient_scaled_per_layer() -> None:
    """The perturbation follows the gradient of the given loss at the weights, scaled to gamma
    times the layer's norm."""
    model, x, y = tiny()
    awp = AdversarialWeightPerturbation(model, gamma=GAMMA)

    def loss_of(net: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(net(x), y)

    delta = awp.perturbation(model, loss_of)
    assert set(delta) == {"1.weight"}  # weights of two dimensions only, as the official code
    (g,) = torch.autograd.grad(loss_of(model), [model[1].weight])
    torch.testing.assert_close(delta["1.weight"], GAMMA * model[1].weight.norm() * g / g.norm())
    assert all(p.grad is None for p in model.parameters())  # the model's gradients untouched


def test_perturbed_puts_back_the_exact_weights_even_after_an_error() -> None:
    model, _, _ = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: torch.full_like(p, 0.1) for n, p in perturbed_parameters(model)}
    with pytest.raises(RuntimeError), perturbed(model, delta):
        assert not torch.equal(model[1].weight, before["1.weight"])
        raise RuntimeError("inside")
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])


def test_awp_leaves_the_models_batchnorm_statistics_alone() -> None:
    """The direction is computed on the proxy: the model's running statistics move only with
    its own training forward, not with AWP's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.rand(8, 1, 5, 5), torch.randint(0, 3, (8,))
    model(x)  # materialise the lazy layer
    awp = AdversarialWeightPerturbation(model, gamma=GAMMA)
    buffers = [b.clone() for b in model.buffers()]
    awp.perturbation(model, lambda net: nn.functional.cross_entropy(net(x), y))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def spec(awp: dict[str, Any] | None) -> JobSpec:
    training: dict[str, Any] = {
        "method": "pgd_at",
        "epochs": 1,
        "batch_size": 128,
        # A step too small to change a float32 weight: whatever the weights are after the epoch
        # is what the step was taken from, so any perturbation left behind would show.
        "optimizer": {"lr": 1e-30, "momentum": 0.0, "weight_decay": 0.0},
        "lr_schedule": "constant",
        "epsilon": 0.1,
        "attack_steps": 2,
    }
    if awp is not None:
        training["awp"] = awp
    return JobSpec.model_validate(
        {"name": "awp", "dataset": {"name": "digits"}, "training": training}
    )


def trained_weights(spec: JobSpec, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    kept: dict[str, dict[str, torch.Tensor]] = {}

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        assert checkpoint_dir is not None
        state = torch.load(checkpoint_dir / STATE_CHECKPOINT, weights_only=True)
        best = load_checkpoint(checkpoint_dir / BEST_CHECKPOINT)
        kept["state"] = state["model"]
        kept["best"] = best.state_dict()

    result = run_training(spec, report, device=torch.device("cpu"))
    assert result.best_model is not None
    kept["result"] = result.best_model.state_dict()
    return kept


def test_no_perturbation_is_left_in_the_stored_weights_or_the_checkpoint(tmp_path: Path) -> None:
    """A large perturbation (gamma 0.5) at every step, steps too small to move the weights:
    the weights in state.pt, best.pt and the result are those of the same run without AWP,
    bit for bit (BatchNorm's statistics differ: the forward ran at other weights)."""
    plain = trained_weights(spec(None), tmp_path)
    with_awp = trained_weights(spec({"gamma": 0.5}), tmp_path)
    # The weights AWP perturbs (biases start at 0, where even a step of 1e-30 shows).
    parameters = [n for n in plain["state"] if n.endswith("weight") and plain["state"][n].dim() > 1]
    assert len(parameters) == 4  # three convolutions and the head
    for where in ("state", "best", "result"):
        for name in parameters:
            assert torch.equal(with_awp[where][name], plain[where][name]), (where, name)
    # Not vacuous: AWP ran (the training forward at perturbed weights moved BN's statistics).
    assert not torch.equal(
        with_awp["state"]["features.0.1.running_mean"], plain["state"]["features.0.1.running_mean"]
    )
