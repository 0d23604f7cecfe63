"""The training step, the LR schedules and run_training end to end on real digits."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.data import load_dataset
from workers.evaluate import clean_accuracy, evaluate_robustness
from workers.models import build_model, load_checkpoint, read_checkpoint_meta
from workers.spec import JobSpec
from workers.training import adversarial_train_step, learning_rate, run_training

EPOCH_METRICS = {
    "epoch",
    "train_loss",
    "train_acc",
    "val_clean_acc",
    "val_robust_acc",
    "lr",
    "train_epsilon",
    "epoch_seconds",
    "images_per_second",
    "best_epoch",
}
TIMINGS = {"epoch_seconds", "images_per_second"}


@dataclass
class Run:
    """What ``run_training`` reported, a copy of each epoch's checkpoint folder, and its best
    model's test numbers as a trial reports them (PGD at the job's evaluation settings)."""

    copies_to: Path
    metrics: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[Path | None] = field(default_factory=list)
    checkpoint_copies: list[Path] = field(default_factory=list)
    result: dict[str, float] = field(default_factory=dict)

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.metrics.append(metrics)
        self.checkpoints.append(checkpoint)
        if checkpoint is not None:
            copy = self.copies_to / f"epoch_{int(metrics['epoch'])}"
            self.checkpoint_copies.append(Path(shutil.copytree(checkpoint, copy)))


def train(spec: JobSpec, copies_to: Path, **kwargs: Any) -> Run:
    copies_to.mkdir(parents=True)
    run = Run(copies_to)
    trained = run_training(spec, run.report, device=torch.device("cpu"), **kwargs)
    if trained.best_model is not None:
        x, y = load_dataset(spec.dataset.name, "test", kwargs.get("data_root"))
        epsilon = spec.evaluation.epsilon
        assert epsilon is not None
        tested = evaluate_robustness(
            trained.best_model, x, y, spec.evaluation, epsilon=epsilon, seed=0
        )
        run.result = {
            "clean_acc": tested.clean_acc,
            "robust_acc": tested.robust_acc,
            "best_epoch": trained.best_epoch,
        }
    return run


def make_spec(**training: Any) -> JobSpec:
    defaults = {
        "method": "pgd_at",
        "epochs": 3,
        "batch_size": 64,
        "optimizer": {"lr": 0.05},
        "lr_schedule": "cosine",
        "epsilon": 0.1,
        "step_size": 0.025,
        "attack_steps": 10,
        "seed": 0,
    }
    data = {"name": "test", "dataset": {"name": "digits"}, "model": {"arch": "small_cnn"}}
    dataset = training.pop("dataset", "digits")
    return JobSpec.model_validate(
        {**data, "dataset": {"name": dataset}, "training": defaults | training}
    )


def without_timings(metrics: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


# -- one step and the schedules ------------------------------------------------------------


@pytest.mark.parametrize("method", ["standard", "pgd_at", "trades", "fgsm_rs", "mart"])
def test_a_train_step_updates_the_model_and_returns_device_tensors(method: str) -> None:
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    model = build_model("small_cnn", in_channels=1).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.clone() for p in model.parameters()]

    out = adversarial_train_step(
        model, optimizer, x[:32], y[:32], method=method, epsilon=0.1, step_size=0.025, steps=3
    )

    assert {"loss", "acc"} <= out.keys()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    assert out["loss"] > 0 and 0 <= out["acc"] <= 1
    assert model.training
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_an_unknown_method_is_an_error() -> None:
    model = build_model("small_cnn", in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown method 'madry'"):
        adversarial_train_step(
            model, optimizer, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64),
            method="madry", epsilon=0.1, step_size=0.1, steps=1,
        )  # fmt: skip


def test_learning_rate_schedules() -> None:
    assert learning_rate("constant", 0.1, 0.9) == 0.1
    assert learning_rate("cosine", 0.1, 0.0) == pytest.approx(0.1)
    assert learning_rate("cosine", 0.1, 0.5) == pytest.approx(0.05)
    assert learning_rate("cosine", 0.1, 0.999) < 1e-5
    # Rice et al.: x0.1 at 50% and at 75% of training.
    piecewise = [learning_rate("piecewise", 0.1, p) for p in (0.0, 0.49, 0.5, 0.74, 0.75, 0.99)]
    assert piecewise == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ValueError, match="unknown lr schedule"):
        learning_rate("linear", 0.1, 0.5)


# -- whole runs on digits ------------------------------------------------------------------


# The tests of these runs go to one pytest-xdist worker (the Makefile's), which trains them once.
DIGITS_RUNS_WORKER = pytest.mark.xdist_group("digits_runs")


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Three epochs of each method on digits at epsilon 0.1, evaluated by PGD-20 at 0.1."""
    root = tmp_path_factory.mktemp("digits-runs")
    return {
        method: train(make_spec(method=method), root / method)
        for method in ("standard", "pgd_at", "trades")
    }


@DIGITS_RUNS_WORKER
def test_adversarial_training_is_much_more_robust_than_standard_training(
    digits_runs: dict[str, Run],
) -> None:
    standard = digits_runs["standard"].result
    # Measured with seeds 0, 1, 2: standard 0.37-0.42, pgd_at 0.65-0.69, trades 0.69-0.74;
    # clean accuracy 0.92-0.98 for all three.
    assert standard["robust_acc"] < 0.5
    for method in ("pgd_at", "trades"):
        result = digits_runs[method].result
        assert result["robust_acc"] > standard["robust_acc"] + 0.15, method
        assert result["robust_acc"] > 0.55, method
        assert result["clean_acc"] > 0.85, method


@DIGITS_RUNS_WORKER
def test_every_epoch_reports_its_metrics_and_a_checkpoint(digits_runs: dict[str, Run]) -> None:
    run = digits_runs["pgd_at"]

    assert [m["epoch"] for m in run.metrics] == [1, 2, 3]
    for metrics in run.metrics:
        assert set(metrics) == EPOCH_METRICS
        for name in ("train_acc", "val_clean_acc", "val_robust_acc"):
            assert 0 <= metrics[name] <= 1
        assert metrics["images_per_second"] > 0 and metrics["epoch_seconds"] > 0
    lrs = [m["lr"] for m in run.metrics]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.05  # cosine, set per step
    assert all(p is not None and not p.exists() for p in run.checkpoints)  # temporary
    assert set(run.result) == {"clean_acc", "robust_acc", "best_epoch"}


@DIGITS_RUNS_WORKER
def test_the_last_checkpoint_is_the_best_epochs_model_the_result_was_measured_on(
    digits_runs: dict[str, Run],
) -> None:
    run = digits_runs["standard"]
    best_epoch = int(run.result["best_epoch"])
    val_robust = [m["val_robust_acc"] for m in run.metrics]
    assert best_epoch == 1 + val_robust.index(max(val_robust))
    last = run.checkpoint_copies[-1]
    assert {p.name for p in last.iterdir()} == {"best.pt", "state.pt"}

    meta = read_checkpoint_meta(last / "best.pt")
    model = load_checkpoint(last / "best.pt")

    assert meta["best_epoch"] == best_epoch
    reported = run.metrics[best_epoch - 1]
    assert meta["metrics"] == {k: v for k, v in reported.items() if k != "best_epoch"}
    assert (meta["arch"], meta["num_classes"], meta["input_shape"]) == ("small_cnn", 10, [1, 8, 8])
    assert (
        JobSpec.model_validate(meta["spec"]).model_dump()
        == make_spec(method="standard").model_dump()
    )
    x, y = load_dataset("digits", "test")
    assert clean_accuracy(model, x, y) == run.result["clean_acc"]


# -- reproducibility, resuming, sharding, other data sets ------------------------------------


@pytest.fixture(scope="module")
def synthetic_spec() -> JobSpec:
    return make_spec(dataset="synthetic", epochs=2, attack_steps=3, lr_schedule="piecewise")


def test_a_seeded_run_repeats_exactly_and_another_seed_does_not(
    synthetic_spec: JobSpec, tmp_path: Path
) -> None:
    first = train(synthetic_spec, tmp_path / "first")
    again = train(synthetic_spec, tmp_path / "again")
    other_seed = synthetic_spec.trial_spec({"training.seed": 1})
    other = train(other_seed, tmp_path / "other")

    assert without_timings(again.metrics) == without_timings(first.metrics)
    assert again.result == first.result
    assert without_timings(other.metrics) != without_timings(first.metrics)


def test_a_resumed_run_continues_exactly_where_its_checkpoint_ended(
    synthetic_spec: JobSpec, tmp_path: Path
) -> None:
    whole = train(synthetic_spec, tmp_path / "whole")

    resumed = train(synthetic_spec, tmp_path / "resumed", resume_from=whole.checkpoint_copies[0])

    assert [m["epoch"] for m in resumed.metrics] == [2]
    assert without_timings(resumed.metrics) == without_timings(whole.metrics[1:])
    assert resumed.result == whole.result


def test_a_resumed_run_with_awp_ema_and_warmup_continues_exactly(tmp_path: Path) -> None:
    """The average is part of the state (state.pt), and the warm-up and AWP follow the run's
    step and epoch: resumed after epoch 1, the run is the whole one's."""
    spec = make_spec(
        dataset="synthetic",
        epochs=2,
        attack_steps=3,
        awp={"gamma": 0.01},
        ema={"decay": 0.5},
        epsilon_warmup_epochs=2,
    )
    whole = train(spec, tmp_path / "whole")

    resumed = train(spec, tmp_path / "resumed", resume_from=whole.checkpoint_copies[0])

    assert [m["epoch"] for m in resumed.metrics] == [2]
    assert without_timings(resumed.metrics) == without_timings(whole.metrics[1:])
    assert resumed.result == whole.result
    assert read_checkpoint_meta(whole.checkpoint_copies[-1] / "best.pt")["weights"] == "ema"


def test_a_rank_other_than_zero_trains_its_shard_and_reports_without_checkpoints(
    synthetic_spec: JobSpec, tmp_path: Path
) -> None:
    run = train(synthetic_spec, tmp_path / "rank1", rank=1, world_size=2)

    assert run.result == {}
    assert run.checkpoints == [None, None]
    expected = EPOCH_METRICS - {"val_clean_acc", "val_robust_acc", "best_epoch"}
    assert all(set(m) == expected for m in run.metrics)


def test_cifar10_trains_end_to_end_from_a_data_folder(
    tiny_cifar10_root: Path, tmp_path: Path
) -> None:
    spec = make_spec(dataset="cifar10", epochs=1, batch_size=32, attack_steps=2, epsilon=8 / 255)

    run = train(spec, tmp_path / "cifar10", data_root=tiny_cifar10_root)

    assert set(run.result) == {"clean_acc", "robust_acc", "best_epoch"}
    meta = read_checkpoint_meta(run.checkpoint_copies[0] / "best.pt")
    assert (meta["input_shape"], meta["num_classes"]) == ([3, 32, 32], 10)


# -- the epsilon warm-up ---------------------------------------------------------------------


def test_the_training_epsilon_follows_the_warmup_ramp(monkeypatch: pytest.MonkeyPatch) -> None:
    """epsilon_warmup_epochs 2 of 3: every step's epsilon and step size are the spec's times
    step / (2 * steps per epoch), then the spec's; each epoch reports its last step's as
    train_epsilon; validation attacks at the full evaluation epsilon throughout."""
    from workers import training as training_module

    used: list[tuple[float, float]] = []
    validated_at: list[float] = []
    real_step = training_module.adversarial_train_step
    real_robust_accuracy = training_module.robust_accuracy

    def recording_step(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        used.append((kwargs["epsilon"], kwargs["step_size"]))
        return real_step(*args, **kwargs)

    def recording_robust_accuracy(*args: Any, **kwargs: Any) -> float:
        validated_at.append(kwargs["epsilon"])
        return real_robust_accuracy(*args, **kwargs)

    monkeypatch.setattr(training_module, "adversarial_train_step", recording_step)
    monkeypatch.setattr(training_module, "robust_accuracy", recording_robust_accuracy)
    spec = make_spec(
        epochs=3, batch_size=128, attack_steps=1, epsilon_warmup_epochs=2, step_size=0.04
    )
    metrics: list[dict[str, float]] = []
    run_training(spec, lambda m, _: metrics.append(m), device=torch.device("cpu"))

    per_epoch = 1077 // 128  # digits' training split, incomplete batches dropped
    warmup = 2 * per_epoch
    assert len(used) == 3 * per_epoch
    for step, (epsilon, step_size) in enumerate(used):
        scale = min(1.0, step / warmup)
        assert epsilon == pytest.approx(0.1 * scale, abs=1e-12)
        assert step_size == pytest.approx(0.04 * scale, abs=1e-12)
    assert used[0] == (0.0, 0.0) and used[warmup] == (pytest.approx(0.1), pytest.approx(0.04))
    assert [m["train_epsilon"] for m in metrics] == pytest.approx(
        [0.1 * (per_epoch - 1) / warmup, 0.1 * (2 * per_epoch - 1) / warmup, 0.1]
    )
    assert validated_at == [0.1, 0.1, 0.1]
