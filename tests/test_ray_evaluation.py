"""Robustness numbers a reviewer accepts, through the whole path on a real Ray cluster:
AutoAttack from the reference code after training (the number stored equals what
``pyautoattack`` gives on the downloaded checkpoint, and never beats PGD), and evaluate jobs
that attack a given model (a trial's checkpoint, or an uploaded ``torch.export`` program) at
several epsilons, giving a robustness curve.

AutoAttack runs on a few dozen test points (``evaluation.autoattack_examples``), so it takes
seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pyautoattack import AutoAttack

from tests.ray_support import (
    Service,
    assert_every_trial_ended,
    get,
    run_cli,
    submit,
    trades_spec,
    wait_until_finished,
)
from workers.attacks import pgd_linf
from workers.autoattack import STANDARD_ATTACKS, trace_function_kept
from workers.data import load_dataset
from workers.models import build_model, load_checkpoint
from workers.training import adversarial_train_step

pytestmark = pytest.mark.ray

AUTOATTACK_EXAMPLES = 12
EPSILON = 0.1


def autoattack_directly(model: torch.nn.Module, examples: int, *, seed: int) -> float:
    """pyautoattack itself, called as its README says, on the first test points."""
    x, y = load_dataset("digits", "test")
    x, y = x[:examples], y[:examples]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray worker of one CPU computes, bit for bit
    try:
        attack = AutoAttack(model, norm="Linf", eps=EPSILON, version="standard", seed=seed)
        with trace_function_kept():  # the suite's coverage
            _, y_adv = attack.run_standard_evaluation(x, y, batch_size=250)
    finally:
        torch.set_num_threads(threads)
    return (y_adv == y).float().mean().item()


def pgd_accuracy(model: torch.nn.Module, examples: int) -> float:
    """PGD-20 (the field's evaluation attack) on the same test points."""
    torch.manual_seed(0)
    x, y = load_dataset("digits", "test")
    x, y = x[:examples], y[:examples]
    x_adv = pgd_linf(model, x, y, epsilon=EPSILON, step_size=EPSILON / 4, steps=20)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_autoattack_runs_after_training_and_is_what_the_reference_code_gives(
    postgres_service: Service, tmp_path: Path
) -> None:
    """On PostgreSQL: a TRADES trial evaluated with AutoAttack; then an evaluate job that
    attacks that trial's checkpoint."""
    with postgres_service.client() as api:
        evaluation = {
            "attack_steps": 3,
            "autoattack": True,
            "autoattack_examples": AUTOATTACK_EXAMPLES,
        }
        job_id = submit(api, trades_spec("autoattack", epochs=2, evaluation=evaluation))
        job = wait_until_finished(api, job_id)
        assert job["status"] == "succeeded", job["error"]
        (trial,) = assert_every_trial_ended(api, job_id)

        autoattack = trial["autoattack"]
        assert autoattack["done"] is True
        assert list(autoattack["after_attack"]) == ["clean", *STANDARD_ATTACKS]
        after = list(autoattack["after_attack"].values())
        assert after == sorted(after, reverse=True)  # each attack only takes away
        assert trial["autoattack_acc"] == autoattack["accuracy"] == after[-1]
        assert autoattack["examples"] == AUTOATTACK_EXAMPLES and autoattack["epsilon"] == EPSILON
        assert autoattack["seconds"] > 0
        assert autoattack["unreliable"] is bool(autoattack["warnings"])
        assert job["best_trial"]["autoattack_acc"] == trial["autoattack_acc"]
        tradeoff = get(api, f"/v1/jobs/{job_id}/tradeoff")
        assert tradeoff["robust_axis"]["metric"] == "autoattack_acc"
        assert tradeoff["points"][0]["robust_acc"] == trial["autoattack_acc"]

        checkpoint = tmp_path / "best.pt"
        checkpoint.write_bytes(api.get(f"/v1/jobs/{job_id}/trials/trial_0000/checkpoint").content)
        model = load_checkpoint(checkpoint)
        assert trial["autoattack_acc"] == autoattack_directly(model, AUTOATTACK_EXAMPLES, seed=0)
        assert trial["autoattack_acc"] <= pgd_accuracy(model, AUTOATTACK_EXAMPLES)

        # The same checkpoint, attacked again by an evaluate job, at two epsilons.
        evaluate = {
            "name": "evaluate-a-trial",
            "kind": "evaluate",
            "source": {"job": job_id, "trial": "trial_0000"},
            "evaluation": {"epsilons": [0.05, EPSILON], "attack_steps": 3},
        }
        evaluate_id = submit(api, evaluate)
        evaluated = wait_until_finished(api, evaluate_id)
        assert evaluated["status"] == "succeeded", evaluated["error"]
        (curve,) = get(api, f"/v1/jobs/{evaluate_id}/curve")
        assert [p["epsilon"] for p in curve["points"]] == [0.05, EPSILON]
        assert {p["clean_acc"] for p in curve["points"]} == {trial["clean_acc"]}
        assert all(p["autoattack_acc"] is None for p in curve["points"])


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A small CNN, PGD-trained for two epochs on digits here, as a torch.export program: a
    model of any PyTorch code, which the evaluate job loads without that code."""
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    model = build_model("small_cnn", in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for start in range(0, len(x) - 63, 64):
            xb, yb = x[start : start + 64], y[start : start + 64]
            adversarial_train_step(
                model, optimizer, xb, yb, method="pgd_at", epsilon=EPSILON, step_size=0.025, steps=3
            )
    model.eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},))
    path = tmp_path_factory.mktemp("exported") / "digits-cnn.pt2"
    torch.export.save(program, path)
    return path, model


@pytest.mark.slow
def test_an_evaluate_job_attacks_an_uploaded_pt2_and_gives_its_curve(
    service: Service, ray_api: httpx.Client, exported_model: tuple[Path, Any], tmp_path: Path
) -> None:
    path, model = exported_model
    uploaded = run_cli(service, "models", "upload", str(path))
    assert uploaded.returncode == 0, uploaded.stderr
    model_id = uploaded.stdout.strip().splitlines()[-1]
    assert get(ray_api, f"/v1/models/{model_id}")["format"] == "torch_export"

    spec = {
        "name": "curve",
        "kind": "evaluate",
        "source": {"model": model_id},
        "evaluation": {
            # Out of order, and large enough that few points are left for Square, the slowest.
            "epsilons": [0.3, EPSILON, 0.2],
            "attack_steps": 10,
            "autoattack": True,
            "autoattack_examples": 8,
        },
    }
    job_id = submit(ray_api, spec)
    job = wait_until_finished(ray_api, job_id)
    assert job["status"] == "succeeded", job["error"]
    (trial,) = assert_every_trial_ended(ray_api, job_id)

    (curve,) = get(ray_api, f"/v1/jobs/{job_id}/curve")
    points = curve["points"]
    assert [p["epsilon"] for p in points] == [EPSILON, 0.2, 0.3]
    x, y = load_dataset("digits", "test")
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert all(p["clean_acc"] == pytest.approx(clean) for p in points)
    for point in points:
        assert point["autoattack"]["done"] is True
        assert point["autoattack_acc"] <= point["autoattack"]["after_attack"]["clean"]
    # Robustness falls as the ball grows, under either attack.
    for name in ("robust_acc", "autoattack_acc"):
        accuracies = [p[name] for p in points]
        assert accuracies == sorted(accuracies, reverse=True), name
    # The job's own numbers are the curve's at its largest epsilon.
    assert (trial["robust_acc"], trial["autoattack_acc"]) == (
        points[-1]["robust_acc"],
        points[-1]["autoattack_acc"],
    )

    plot = tmp_path / "curve.png"
    drawn = run_cli(service, "curve", job_id, "--plot", str(plot))
    assert drawn.returncode == 0, drawn.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.3000" in drawn.stdout


def test_an_evaluate_job_needs_a_source_it_may_use(ray_api: httpx.Client) -> None:
    unknown_model = {"name": "e", "kind": "evaluate", "source": {"model": "0" * 32}}
    response = ray_api.post("/v1/jobs", json=unknown_model)
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "source.model"
    unknown_trial = {"name": "e", "kind": "evaluate", "source": {"job": "0" * 32, "trial": "t"}}
    response = ray_api.post("/v1/jobs", json=unknown_trial)
    assert response.status_code == 422
    assert response.json()["error"]["fields"][0]["field"] == "source.trial"
