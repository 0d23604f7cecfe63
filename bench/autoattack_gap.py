"""How far PGD-20 overstates robustness, and what AutoAttack costs next to it: every trial of
an example sweep trained as a Ray trial trains it (``run_training``, on this machine's CPU or
GPU), then its best model attacked on the test split by PGD-20 and by AutoAttack "standard"
(the reference ``pyautoattack``), each timed.

    python bench/autoattack_gap.py                                   # the digits beta sweep
    python bench/autoattack_gap.py --examples 100                    # AutoAttack on 100 points
    python bench/autoattack_gap.py --spec examples/other.yaml

It prints one row per trial (clean, PGD-20, AutoAttack, the gap, seconds of each attack) and
the ratio of AutoAttack's time to PGD-20's.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

from workers.autoattack import run_autoattack
from workers.data import load_dataset
from workers.device import default_device
from workers.evaluate import clean_accuracy, robust_accuracy
from workers.spec import JobSpec, grid_combinations
from workers.training import pgd_settings, run_training

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "trades_beta_sweep.yaml")
    parser.add_argument("--examples", type=int, default=None, help="AutoAttack's test points")
    args = parser.parse_args()

    spec = JobSpec.model_validate(yaml.safe_load(args.spec.read_text()))
    device = default_device()
    x_test, y_test = load_dataset(spec.dataset.name, "test")
    x_test, y_test = x_test.to(device), y_test.to(device)
    examples = args.examples or len(x_test)
    overrides = grid_combinations(spec.sweep) if spec.sweep else [{}]
    print(
        f"{spec.name}: {len(overrides)} trials, {device} ({platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads), {datetime.now():%Y-%m-%d %H:%M}; PGD-"
        f"{spec.evaluation.attack_steps} on {len(x_test)} test points, AutoAttack on {examples}"
    )
    print("config | clean | PGD-20 | AutoAttack | gap (points) | PGD s | AutoAttack s")
    ratios = []
    for override in overrides:
        trial = spec.trial_spec(override)
        trained = run_training(trial, lambda metrics, checkpoint_dir: None, device=device)
        model = trained.best_model
        assert model is not None
        started = time.perf_counter()
        pgd = robust_accuracy(model, x_test, y_test, **pgd_settings(trial.evaluation))
        pgd_seconds = time.perf_counter() - started
        pgd_same = (
            pgd
            if examples == len(x_test)
            else robust_accuracy(
                model, x_test[:examples], y_test[:examples], **pgd_settings(trial.evaluation)
            )
        )
        autoattack = run_autoattack(
            model,
            x_test[:examples],
            y_test[:examples],
            epsilon=float(trial.evaluation.epsilon or 0),
            seed=trial.training.seed,
        )
        ratios.append(autoattack.seconds / pgd_seconds * len(x_test) / examples)
        print(
            f"{override} | {100 * clean_accuracy(model, x_test, y_test):.1f} | {100 * pgd:.1f} | "
            f"{100 * autoattack.accuracy:.1f} | {100 * (pgd_same - autoattack.accuracy):.1f} | "
            f"{pgd_seconds:.1f} | {autoattack.seconds:.1f}  (after each attack: "
            + ", ".join(f"{k} {100 * v:.1f}" for k, v in autoattack.after_attack.items())
            + ")",
            flush=True,
        )
    print(f"AutoAttack costs {min(ratios):.0f}x to {max(ratios):.0f}x PGD-20's time per test point")


if __name__ == "__main__":
    main()
