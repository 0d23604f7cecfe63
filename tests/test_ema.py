"""The EMA of the weights (workers.ema): its closed form after k steps, BatchNorm buffers that
follow the trained model, and a run whose validation, best epoch, checkpoint and result are of
the averaged model, saying so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from workers import training as training_module
from workers.data import load_dataset
from workers.ema import WeightAverage
from workers.evaluate import clean_accuracy
from workers.models import load_checkpoint, read_checkpoint_meta
from workers.spec import JobSpec
from workers.training import BEST_CHECKPOINT, STATE_CHECKPOINT, run_training


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()


def set_weights(model: nn.Module, step: int) -> list[torch.Tensor]:
    """Give the model the weights w_step (random, reproducible) and move BN's statistics."""
    generator = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    model.train()(torch.randn(8, 3, generator=generator, dtype=torch.float64))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("decay", "warmup_steps"), [(0.9, 0), (0.75, 2), (0.999, 0)])
def test_the_average_equals_its_closed_form_after_k_steps(decay: float, warmup_steps: int) -> None:
    """avg_k = d^(k-s) w_s + (1 - d) sum_{i=s+1..k} d^(k-i) w_i, where s is the last warm-up step
    (w_0, the starting weights, when there is no warm-up)."""
    model = tiny()
    w0 = [p.detach().clone() for p in model.parameters()]
    average = WeightAverage(model, decay=decay, warmup_steps=warmup_steps)
    history = [w0]
    k = 5
    for step in range(1, k + 1):
        history.append(set_weights(model, step))
        average.update(model)
    s = warmup_steps
    for index, avg in enumerate(average.model.parameters()):
        expected = decay ** (k - s) * history[s][index]
        for i in range(s + 1, k + 1):
            expected = expected + (1 - decay) * decay ** (k - i) * history[i][index]
        torch.testing.assert_close(avg, expected, rtol=1e-12, atol=1e-12)
    assert average.steps == k
    # Not the trained weights themselves.
    assert not torch.allclose(next(average.model.parameters()), history[k][0])


def test_batchnorm_buffers_are_copied_not_averaged() -> None:
    model = tiny()
    average = WeightAverage(model, decay=0.9)
    for step in range(1, 4):
        set_weights(model, step)
        average.update(model)
        for avg_buffer, buffer in zip(average.model.buffers(), model.buffers(), strict=True):
            assert torch.equal(avg_buffer, buffer)
    assert int(model[1].num_batches_tracked) == 3
    # The average is a separate copy, in eval mode, that takes no gradient.
    assert not average.model.training
    assert all(not p.requires_grad for p in average.model.parameters())


def test_the_state_round_trips() -> None:
    model = tiny()
    average = WeightAverage(model, decay=0.9)
    set_weights(model, 1)
    average.update(model)
    restored = WeightAverage(tiny(), decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.steps == 1
    expected = average.model.state_dict()
    for name, value in restored.model.state_dict().items():
        assert torch.equal(value, expected[name])


def ema_spec(**training: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "ema",
            "dataset": {"name": "digits"},
            "training": {
                "method": "pgd_at",
                "epochs": 1,
                "batch_size": 128,
                "optimizer": {"lr": 0.05},
                "epsilon": 0.1,
                "attack_steps": 2,
                "ema": {"decay": 0.5},
                **training,
            },
            "evaluation": {"attack_steps": 2},
        }
    )


def test_a_run_with_ema_validates_keeps_and_checkpoints_the_average(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    averages: list[WeightAverage] = []

    class Recorded(WeightAverage):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            averages.append(self)

    monkeypatch.setattr(training_module, "WeightAverage", Recorded)
    reported: list[tuple[dict[str, float], Any, Any, dict[str, Any]]] = []

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        assert checkpoint_dir is not None
        best = load_checkpoint(checkpoint_dir / BEST_CHECKPOINT)
        state = torch.load(checkpoint_dir / STATE_CHECKPOINT, weights_only=True)
        meta = read_checkpoint_meta(checkpoint_dir / BEST_CHECKPOINT)
        reported.append((metrics, best.state_dict(), state, meta))

    result = run_training(ema_spec(), report, device=torch.device("cpu"))

    (average,) = averages
    metrics, best, state, meta = reported[-1]
    assert result.weights == "ema" and meta["weights"] == "ema"
    assert average.steps == 8  # every optimizer step of the epoch (1,077 // 128)
    ema_state = average.model.state_dict()
    assert result.best_model is not None
    for name, value in ema_state.items():
        assert torch.equal(best[name], value), name
        assert torch.equal(result.best_model.state_dict()[name], value), name
        assert torch.equal(state["ema"]["model"][name], value), name
    # The trained weights are not what was kept (decay 0.5: the average lags them).
    assert not torch.equal(state["model"]["head.weight"], ema_state["head.weight"])
    # Validation was of the average.
    x_val, y_val = load_dataset("digits", "val")
    assert metrics["val_clean_acc"] == clean_accuracy(average.model, x_val, y_val)


def test_a_run_without_ema_says_trained_weights() -> None:
    metas: list[dict[str, Any]] = []

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        assert checkpoint_dir is not None
        metas.append(read_checkpoint_meta(checkpoint_dir / BEST_CHECKPOINT))

    spec = ema_spec(ema=None)
    result = run_training(spec, report, device=torch.device("cpu"))
    assert result.weights == "trained" and metas[-1]["weights"] == "trained"
