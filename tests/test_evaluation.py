"""Evaluation as the field runs it, without Ray: AutoAttack from the reference code (resumed
from its state file after an interruption), fp32 evaluation, BatchNorm during the training
attack, the input normalisation inside the model, and model files of either format."""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType

import pytest
import torch
from pyautoattack import AutoAttack
from pyautoattack.state import EvaluationState
from torch import nn

from workers import device as device_module
from workers.attacks import fgsm, pgd_linf, trades_attack
from workers.autoattack import STANDARD_ATTACKS, run_autoattack, trace_function_kept
from workers.data import NORMALIZATIONS, load_dataset
from workers.device import autocast, full_precision
from workers.evaluate import clean_accuracy, evaluate_robustness, robust_accuracy
from workers.model_format import NotAModelFile, model_format
from workers.models import (
    Normalized,
    build_model,
    load_checkpoint,
    load_model,
    model_architecture,
    save_checkpoint,
)
from workers.models.checkpoint import UNKNOWN_ARCH
from workers.spec import EvaluationSpec
from workers.training import adversarial_train_step

EPSILON = 0.1


@pytest.fixture(scope="module")
def linear_digits_model() -> nn.Module:
    """A linear classifier of digits, trained for a few seconds: small enough that AutoAttack's
    four attacks run in seconds, and robust on some points at a small epsilon."""
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def test_autoattack_is_the_reference_codes_and_resumes_after_its_last_finished_attack(
    linear_digits_model: nn.Module, tmp_path: Path
) -> None:
    x, y = load_dataset("digits", "test")
    x, y = x[:8], y[:8]
    whole = run_autoattack(linear_digits_model, x, y, epsilon=EPSILON, seed=0)
    assert list(whole.after_attack) == ["clean", *STANDARD_ATTACKS]
    assert 0 < whole.accuracy < whole.after_attack["clean"]
    reference = AutoAttack(
        linear_digits_model, norm="Linf", eps=EPSILON, version="standard", seed=0
    )
    with trace_function_kept():  # the suite's coverage
        _, y_adv = reference.run_standard_evaluation(x, y, batch_size=250)
    assert whole.accuracy == (y_adv == y).float().mean().item()

    # Cut short after its second attack (the process died), it resumes from the state file:
    # it runs only what is left, and ends where an uninterrupted run does.
    state = tmp_path / "autoattack.json"

    class Interrupted(Exception):
        pass

    def die_after_apgd_t(attack: str, accuracy: float, seconds: float) -> None:
        if attack == "apgd-t":
            raise Interrupted

    with pytest.raises(Interrupted):
        run_autoattack(
            linear_digits_model, x, y, epsilon=EPSILON, seed=0, state_path=state,
            on_attack=die_after_apgd_t,
        )  # fmt: skip
    saved = EvaluationState.from_disk(state)  # the package's own state file
    assert set(saved.run_attacks) == {"apgd-ce", "apgd-t"}

    attacks_run: list[str] = []
    resumed = run_autoattack(
        linear_digits_model, x, y, epsilon=EPSILON, seed=0, state_path=state,
        on_attack=lambda attack, accuracy, seconds: attacks_run.append(attack),
    )  # fmt: skip
    assert attacks_run == ["fab-t", "square"]
    assert resumed.accuracy == whole.accuracy
    assert resumed.after_attack == whole.after_attack


def test_autoattack_leaves_the_trace_function_of_the_process_in_place(
    linear_digits_model: nn.Module,
) -> None:
    """AutoAttack's check for dynamic defenses drops the thread's trace function (a debugger's,
    the suite's coverage); run_autoattack puts it back."""
    x, y = load_dataset("digits", "test")

    def tracer(frame: FrameType, event: str, arg: object) -> None:
        return None  # sees calls only

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        run_autoattack(linear_digits_model, x[:4], y[:4], epsilon=EPSILON, seed=0)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)


def test_autoattack_passes_on_the_warnings_of_its_checks(linear_digits_model: nn.Module) -> None:
    """A model that outputs probabilities, not logits: AutoAttack's own check warns, and the
    result is flagged potentially unreliable, as RobustBench flags it."""
    model = nn.Sequential(linear_digits_model, nn.Softmax(dim=1)).eval()
    x, y = load_dataset("digits", "test")
    result = run_autoattack(model, x[:4], y[:4], epsilon=0.3, seed=0)
    assert any("probability distribution" in warning for warning in result.warnings)
    assert result.unreliable and result.as_report()["unreliable"] is True


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast("cuda") on this CPU
def test_evaluation_runs_in_fp32_and_training_may_not(linear_digits_model: nn.Module) -> None:
    """What every forward pass sees: mixed precision is off in evaluation, on in training (it
    only takes effect on CUDA, where the same code runs in bf16 autocast)."""
    seen: list[bool] = []

    class Recording(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(device_module._mixed_precision.get())
            out: torch.Tensor = self.inner(x)
            return out

    model = Recording(linear_digits_model)
    x, y = load_dataset("digits", "test")
    evaluation = EvaluationSpec(epsilon=EPSILON, step_size=EPSILON / 4, attack_steps=2)
    evaluate_robustness(model, x[:8], y[:8], evaluation, epsilon=EPSILON, seed=0)
    run_autoattack(model, x[:2], y[:2], epsilon=0.3, seed=0)
    assert seen and not any(seen)

    seen.clear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    adversarial_train_step(
        model, optimizer, x[:8], y[:8], method="pgd_at", epsilon=EPSILON, step_size=0.01, steps=1
    )
    assert seen and all(seen)

    assert isinstance(autocast(torch.device("cuda")), torch.autocast)
    with full_precision():
        assert not isinstance(autocast(torch.device("cuda")), torch.autocast)


def batch_norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.named_buffers() if "running" in name]


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y, bn: pgd_linf(m, x, y, epsilon=0.1, step_size=0.05, steps=2, attack_bn=bn),
        lambda m, x, y, bn: fgsm(m, x, y, epsilon=0.1, random_start=True, attack_bn=bn),
        lambda m, x, y, bn: trades_attack(m, x, epsilon=0.1, step_size=0.05, steps=2, attack_bn=bn),
    ],
    ids=["pgd", "fgsm", "trades"],
)
def test_attack_bn_says_whether_the_attack_uses_and_moves_batch_statistics(attack) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    x, y = x[:32], y[:32]
    model = build_model("small_cnn", in_channels=1).train()

    before = batch_norm_buffers(model)
    attack(model, x, y, "eval")
    assert all(torch.equal(a, b) for a, b in zip(before, batch_norm_buffers(model), strict=True))

    attack(model, x, y, "train")  # Rice et al.'s and Wong et al.'s: the model in train mode
    assert not any(
        torch.equal(a, b) for a, b in zip(before, batch_norm_buffers(model), strict=True)
    )
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_the_normalisation_is_the_models_first_layer_and_attacks_stay_in_pixel_space(
    tmp_path: Path, tiny_cifar10_root: Path
) -> None:
    torch.manual_seed(0)
    normalization = NORMALIZATIONS["cifar10"]
    model = build_model("small_cnn", normalization=normalization).eval()
    assert isinstance(model, Normalized)
    x, y = load_dataset("cifar10", "test", tiny_cifar10_root)
    mean = torch.tensor(normalization.mean).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))

    x_adv = pgd_linf(model, x, y, epsilon=8 / 255, step_size=2 / 255, steps=3)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1

    meta = {
        "arch": "small_cnn",
        "num_classes": 10,
        "input_shape": (3, 32, 32),
        "normalization": normalization.as_meta(),
    }
    loaded = load_checkpoint(save_checkpoint(tmp_path / "best.pt", model, meta))
    assert isinstance(loaded, Normalized)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_model_file_is_a_checkpoint_or_a_torch_export_program_or_refused(
    linear_digits_model: nn.Module, tmp_path: Path
) -> None:
    x, y = load_dataset("digits", "test")
    program = torch.export.export(
        linear_digits_model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "model.pt2")
    assert model_format(tmp_path / "model.pt2") == "torch_export"
    exported = load_model(tmp_path / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(exported(x), linear_digits_model(x))
    # The attacks drive it as any module: eval mode, frozen parameters, input gradients.
    assert clean_accuracy(exported, x, y) == clean_accuracy(linear_digits_model, x, y)
    assert 0 <= robust_accuracy(exported, x, y, epsilon=0.1, step_size=0.05, steps=2) < 1

    cnn = build_model("small_cnn", in_channels=1)
    meta = {"arch": "small_cnn", "num_classes": 10, "input_shape": (1, 8, 8)}
    save_checkpoint(tmp_path / "best.pt", cnn, meta)
    assert model_format(tmp_path / "best.pt") == "advorch"
    assert isinstance(load_model(tmp_path / "best.pt"), type(cnn))
    # What an evaluate job reports it attacked: the checkpoint's architecture; a program's is
    # not in the file.
    resnet = build_model("preact_resnet18", in_channels=1)
    meta = {"arch": "preact_resnet18", "num_classes": 10, "input_shape": (1, 8, 8)}
    assert model_architecture(save_checkpoint(tmp_path / "resnet.pt", resnet, meta)) == (
        "preact_resnet18"
    )
    assert model_architecture(tmp_path / "model.pt2") == UNKNOWN_ARCH

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(NotAModelFile, match="not a PyTorch archive"):
        model_format(tmp_path / "notes.txt")
