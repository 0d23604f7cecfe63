"""Does stopping trials early pay? The same beta x epsilon grid run to the end (FIFO), under
ASHA and under synchronous successive halving, through a real ``advorch serve``: the epochs
each trains and the best validation robust accuracy each finds, the number the job's best
trial is chosen by. Each trial's validation robust accuracy per epoch is printed too.

    python bench/asha.py                         # 3 betas x 3 epsilons, 8 epochs, digits
    python bench/asha.py --epochs 12 --betas 1 3 6 --epsilons 0.05 0.1
    python bench/asha.py --schedulers fifo halving

Each scheduler runs with the settings ``scheduler: asha`` / ``halving`` give users
(``workers.sweep``, ``workers.halving``). Target (issue 10): a best within 1 point of the
grid's for at most 40% of its epochs.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime
from typing import Any

import httpx
from live_service import epochs_of, finished, running_service, submit, wait

from workers.sweep import REDUCTION_FACTOR, first_rung, halving_rungs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.0, 6.0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument(
        "--schedulers",
        nargs="+",
        choices=["fifo", "asha", "halving"],
        default=["fifo", "asha", "halving"],
        help="fifo first: the shares and the points are against its run",
    )
    args = parser.parse_args()

    def spec(scheduler: str) -> dict[str, Any]:
        return {
            "name": f"bench-asha-{scheduler}",
            "dataset": {"name": "digits"},
            "model": {"arch": "small_cnn"},
            "training": {"method": "trades", "epochs": args.epochs, "batch_size": 64,
                         "epsilon": 0.1, "attack_steps": 3},
            "evaluation": {"epsilon": 0.1, "attack_steps": 5},
            "sweep": {"parameters": {"training.beta": {"grid": args.betas},
                                     "training.epsilon": {"grid": args.epsilons}},
                      "scheduler": scheduler, "max_concurrent_trials": args.max_concurrent},
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
        }  # fmt: skip

    configs = len(args.betas) * len(args.epsilons)
    print(f"{configs} configurations x {args.epochs} epochs, digits small_cnn, TRADES, "
          f"validation PGD-5 at epsilon 0.1; ASHA: grace period "
          f"{first_rung(args.epochs)}; halving: rungs at epochs {halving_rungs(args.epochs)}; "
          f"the best 1 in {REDUCTION_FACTOR} going on at each rung; "
          f"{platform.node()}, {datetime.now():%Y-%m-%d %H:%M}")  # fmt: skip
    with running_service() as api:
        rows = [run(api, spec(scheduler)) for scheduler in args.schedulers]
    grid_epochs, grid_best = rows[0][1], rows[0][2]
    print("scheduler | epochs trained | share of the grid's | best val robust acc | wall s")
    for scheduler, epochs, best, wall in rows:
        print(f"{scheduler} | {epochs} | {epochs / grid_epochs:.0%} | {best:.1%} "
              f"({(best - grid_best) * 100:+.1f} points) | {wall:.0f}")  # fmt: skip


def run(api: httpx.Client, spec: dict[str, Any]) -> tuple[str, int, float, float]:
    started = time.perf_counter()
    job_id = submit(api, spec)
    job = wait(lambda: finished(api, job_id), "the job to finish", timeout_s=7200)
    wall = time.perf_counter() - started
    assert job["status"] == "succeeded", job["error"]
    epochs, best = 0, 0.0
    for trial in api.get(f"/v1/jobs/{job_id}/trials").json():
        metrics = epochs_of(api, job_id, trial["key"])
        epochs += len(metrics)
        best = max([best, *(m["val_robust_acc"] for m in metrics)])
        print(f"  {spec['sweep']['scheduler']} {trial['key']} {trial['config']}: "
              f"{trial['status']} after {len(metrics)} epochs, best val robust "
              f"{max(m['val_robust_acc'] for m in metrics):.1%}; per epoch "
              f"{' '.join(format(m['val_robust_acc'], '.3f') for m in metrics)}")  # fmt: skip
    return spec["sweep"]["scheduler"], epochs, best, wall


if __name__ == "__main__":
    main()
