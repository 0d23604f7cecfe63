"""The methods of issue 12 side by side on digits: TRADES and PGD-AT with and without AWP, TRADES
with an EMA of the weights, and MART, each trained with the project's own ``run_training``
(plain PyTorch, no Ray) for the same epochs, several seeds each, then its best epoch's model
(chosen on validation; the EMA model for the EMA rows) attacked on the test split by PGD-20
and by AutoAttack "standard" (the reference pyautoattack, through workers.autoattack).

    python bench/methods.py                        # 3 seeds, AutoAttack on 120 test points
    python bench/methods.py --seeds 1 --rows TRADES MART
    python bench/methods.py --results /tmp/methods.jsonl   # keeps each run; a rerun skips them
    python bench/methods.py --only-seed 1 --threads 1 &    # one process per seed, in parallel
    python bench/methods.py --table                        # the table of what the file holds
    python bench/methods.py --step-cost                    # AWP's cost per training step

Each run is appended to ``--results`` as one JSON line as soon as it ends, so a long run that
is interrupted loses at most one model; the table (mean ± std over seeds, markdown) is printed
at the end. Wall time is the training's (every epoch's train and validation), not the attacks'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from workers.autoattack import run_autoattack
from workers.data import load_dataset
from workers.evaluate import clean_accuracy, robust_accuracy
from workers.spec import JobSpec
from workers.training import pgd_settings, run_training

EPOCHS = 5
# What every row shares: digits' small CNN at epsilon 0.1 (about 1.6 of its 16 grey levels),
# the example sweep's optimiser and schedule, PGD-20 at epsilon / 4 for the evaluation.
BASE: dict[str, Any] = {
    "name": "methods",
    "dataset": {"name": "digits"},
    "model": {"arch": "small_cnn"},
    "training": {
        "epochs": EPOCHS,
        "batch_size": 64,
        "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
        "lr_schedule": "cosine",
        "epsilon": 0.1,
        "step_size": 0.025,
        "attack_steps": 10,
    },
    "evaluation": {"attack_steps": 20, "restarts": 1},
}
# 1,077 training images in batches of 64: 16 steps an epoch, 80 in a run. The papers' EMA decay
# (0.999 and up) averages over thousands of steps and would leave the average near the random
# start here, so the decay is scaled to the run: a horizon of ~20 steps, after a warm-up of one
# epoch. Chosen once from that reasoning, not tuned on the results.
EMA = {"decay": 0.95, "warmup_steps": 16}
# The official code's gamma for each (csdongxian/AWP): 0.005 for TRADES-AWP, 0.01 for AT-AWP.
ROWS: dict[str, dict[str, Any]] = {
    "TRADES": {"method": "trades", "beta": 6.0},
    "TRADES+AWP": {"method": "trades", "beta": 6.0, "awp": {"gamma": 0.005}},
    "TRADES+EMA": {"method": "trades", "beta": 6.0, "ema": EMA},
    "TRADES+AWP+EMA": {"method": "trades", "beta": 6.0, "awp": {"gamma": 0.005}, "ema": EMA},
    "MART": {"method": "mart", "beta": 6.0},
    "PGD-AT": {"method": "pgd_at"},
    "PGD-AT+AWP": {"method": "pgd_at", "awp": {"gamma": 0.01}},
}


def spec_of(row: str, seed: int) -> JobSpec:
    data = json.loads(json.dumps(BASE))
    data["training"] |= ROWS[row] | {"seed": seed}
    return JobSpec.model_validate(data)


def run_one(row: str, seed: int, examples: int | None) -> dict[str, Any]:
    """Train and attack one row at one seed; ``examples`` None: no AutoAttack."""
    spec = spec_of(row, seed)
    torch.manual_seed(seed)
    epoch_seconds: list[float] = []
    started = time.perf_counter()
    trained = run_training(
        spec,
        lambda metrics, _: epoch_seconds.append(metrics["epoch_seconds"]),
        device=torch.device("cpu"),
    )
    train_seconds = time.perf_counter() - started
    model = trained.best_model
    assert model is not None
    x, y = load_dataset("digits", "test")
    pgd = robust_accuracy(model, x, y, **pgd_settings(spec.evaluation))
    common = {
        "row": row,
        "seed": seed,
        "clean": clean_accuracy(model, x, y),
        "pgd20": pgd,
        "train_seconds": train_seconds,
        "epoch_seconds": epoch_seconds,
        "best_epoch": trained.best_epoch,
        "weights": trained.weights,
    }
    if examples is None:
        return common
    autoattack = run_autoattack(
        model, x[:examples], y[:examples], epsilon=float(spec.evaluation.epsilon or 0), seed=seed
    )
    return {
        "row": row,
        "seed": seed,
        "clean": clean_accuracy(model, x, y),
        "pgd20": pgd,
        "autoattack": autoattack.accuracy,
        "autoattack_examples": examples,
        "pgd20_on_autoattack_points": robust_accuracy(
            model, x[:examples], y[:examples], **pgd_settings(spec.evaluation)
        ),
        "train_seconds": train_seconds,
        "epoch_seconds": epoch_seconds,
        "autoattack_seconds": autoattack.seconds,
        "best_epoch": trained.best_epoch,
        "weights": trained.weights,
    }


def step_cost(rounds: int) -> None:
    """AWP's cost per step, apart from the rest of a run: one training step of each of TRADES,
    TRADES+AWP, PGD-AT and PGD-AT+AWP on the same digits batch of 64, in turn, ``rounds`` times
    after one untimed round; the fastest and the median of each (on a shared machine the
    slower steps add only other processes' time), and AWP's ratio to its base."""
    from workers.awp import AdversarialWeightPerturbation
    from workers.models import build_model
    from workers.training import adversarial_train_step

    x, y = load_dataset("digits", "train")
    x, y = x[:64], y[:64]
    kinds = {
        "TRADES": ("trades", None),
        "TRADES+AWP": ("trades", 0.005),
        "PGD-AT": ("pgd_at", None),
        "PGD-AT+AWP": ("pgd_at", 0.01),
    }
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    awps = {
        name: AdversarialWeightPerturbation(model, gamma=gamma) if gamma else None
        for name, (_, gamma) in kinds.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in kinds}
    for index in range(rounds + 1):
        for name, (method, _) in kinds.items():
            started = time.perf_counter()
            adversarial_train_step(
                model, optimizer, x, y, method=method, epsilon=0.1, step_size=0.025, steps=10,
                awp=awps[name],
            )  # fmt: skip
            if index > 0:
                seconds[name].append(time.perf_counter() - started)
    print("| step | fastest s | median s | vs its base (fastest) | vs its base (median) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, times in seconds.items():
        base = seconds[name.removesuffix("+AWP")]
        print(
            f"| {name} | {min(times):.3f} | {statistics.median(times):.3f} "
            f"| {min(times) / min(base):.2f}x "
            f"| {statistics.median(times) / statistics.median(base):.2f}x |"
        )


def claim(folder: Path, row: str, seed: int) -> bool:
    """Whether this process is the first to claim ``(row, seed)`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / f"{row}-{seed}", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def mean_std(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def table(results: list[dict[str, Any]], rows: list[str]) -> str:
    # No ratio of wall times here: runs that shared the machine with different loads do not
    # compare; AWP's cost per step is --step-cost's.
    lines = [
        "| method | clean | PGD-20 | AutoAttack | PGD-20 on the AutoAttack points | "
        "training wall s | AutoAttack wall s | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        runs = [r for r in results if r["row"] == row]
        if not runs:
            lines.append(f"| {row} | not finished | | | | | | 0 |")
            continue
        lines.append(
            f"| {row} | {mean_std([r['clean'] for r in runs])} "
            f"| {mean_std([r['pgd20'] for r in runs])} "
            f"| {mean_std([r['autoattack'] for r in runs])} "
            f"| {mean_std([r['pgd20_on_autoattack_points'] for r in runs])} "
            f"| {mean_std([r['train_seconds'] for r in runs], 1.0)} "
            f"| {mean_std([r['autoattack_seconds'] for r in runs], 1.0)} | {len(runs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=120, help="AutoAttack's test points")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--results", type=Path, default=Path("/tmp/advorch-methods.jsonl"))
    parser.add_argument("--only-seed", type=int, default=None, help="run this seed only")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads")
    parser.add_argument("--table", action="store_true", help="only print the table")
    parser.add_argument(
        "--claims",
        type=Path,
        default=None,
        help="a folder where each process claims its (row, seed) before running it, so that "
        "several processes (one --reverse) share the work without doing any twice",
    )
    parser.add_argument("--reverse", action="store_true", help="run the rows last to first")
    parser.add_argument("--no-autoattack", action="store_true", help="clean and PGD-20 only")
    parser.add_argument("--step-cost", type=int, nargs="?", const=20, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.step_cost is not None:
        step_cost(args.step_cost)
        return

    done: list[dict[str, Any]] = []
    if args.results.exists():
        done = [json.loads(line) for line in args.results.read_text().splitlines() if line]
    if args.table:
        print(table([r for r in done if r["seed"] < args.seeds], args.rows))
        return
    print(
        f"digits small_cnn, eps 0.1, {EPOCHS} epochs, seeds 0-{args.seeds - 1}; CPU "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; AutoAttack on the first {args.examples} of "
        "360 test points",
        flush=True,
    )
    # Seed by seed, so that an interrupted run has every row for the seeds it finished.
    seeds = [args.only_seed] if args.only_seed is not None else list(range(args.seeds))
    rows = args.rows[::-1] if args.reverse else args.rows
    for seed in seeds:
        for row in rows:
            if any(r["row"] == row and r["seed"] == seed for r in done):
                continue
            if args.claims is not None and not claim(args.claims, row, seed):
                continue
            result = run_one(row, seed, None if args.no_autoattack else args.examples)
            done.append(result)
            with args.results.open("a") as out:
                out.write(json.dumps(result) + "\n")
            print(
                f"{row} seed {seed}: clean {100 * result['clean']:.1f}, PGD-20 "
                f"{100 * result['pgd20']:.1f}, AutoAttack "
                f"{100 * result.get('autoattack', float('nan')):.1f}, "
                f"train {result['train_seconds']:.1f} s, AutoAttack "
                f"{result.get('autoattack_seconds', 0.0):.1f} s",
                flush=True,
            )
    print(table([r for r in done if r["seed"] < args.seeds], args.rows))


if __name__ == "__main__":
    main()
