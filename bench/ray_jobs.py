"""What running on Ray adds to a job, through the REST API of a real ``advorch serve`` (the
embedded default: SQLite and a local Ray head, in a temporary ADVORCH_HOME):

- POST -> first epoch: from ``POST /v1/jobs`` of a one-trial digits job to its first epoch's
  metrics being readable through the API;
- per-trial overhead: over a 4-trial beta sweep run one trial at a time, each trial's wall
  time (from the previous trial's final results, or the job running for the first, to its own)
  minus the sum of its epochs' ``epoch_seconds``: the trial's launch by Tune, the Ray Train
  start, loading the data, the final test evaluation and the reports. The median is the figure
  (issue 10's target: at most 3 s);
- the sweep's wall time, POST to succeeded.

``--rev REV`` measures that revision too (a git worktree of it, run with this virtualenv), in
the same run, so one table compares before and after on the same machine state.

    python bench/ray_jobs.py                      # this tree
    python bench/ray_jobs.py --rev 53dc6b7        # and 53dc6b7, before it
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from live_service import epochs_of, finished, running_service, seconds, submit, wait

ROOT = Path(__file__).resolve().parents[1]


def job_spec(name: str, *, epochs: int, betas: list[float] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "dataset": {"name": "digits"},
        "model": {"arch": "small_cnn"},
        "training": {"method": "trades", "epochs": epochs, "batch_size": 64,
                     "epsilon": 0.1, "attack_steps": 2},
        "evaluation": {"attack_steps": 3},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }  # fmt: skip
    if betas:
        spec["sweep"] = {"parameters": {"training.beta": {"grid": betas}},
                         "max_concurrent_trials": 1}  # fmt: skip
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rev", help="also measure this git revision, before this tree")
    args = parser.parse_args()

    print(f"{platform.node()}, {datetime.now():%Y-%m-%d %H:%M}; digits small_cnn TRADES, "
          f"{args.epochs} epochs a trial, 1 CPU a trial, one at a time")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="advorch-rev-") as checkout:
        if args.rev:
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", checkout, args.rev],
                           check=True, capture_output=True)  # fmt: skip
            try:
                rows.append((args.rev, measure(Path(checkout), args.epochs)))
            finally:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", checkout],
                               check=True)  # fmt: skip
        rows.append(("this tree", measure(None, args.epochs)))
    print("code | POST -> first epoch s | per-trial overhead s (median, min-max) | 4-trial sweep s")
    for name, (first_epoch, overheads, sweep_s) in rows:
        print(f"{name} | {first_epoch:.1f} | {statistics.median(overheads):.1f} "
              f"({min(overheads):.1f}-{max(overheads):.1f}) | {sweep_s:.0f}")  # fmt: skip


def measure(code: Path | None, epochs: int) -> tuple[float, list[float], float]:
    with running_service(code) as api:
        posted = time.perf_counter()
        job_id = submit(api, job_spec("bench-one-trial", epochs=epochs))
        wait(lambda: _any_epoch(api, job_id), "the first epoch's metrics", poll_s=0.05)
        first_epoch = time.perf_counter() - posted
        _succeeded(api, job_id)

        posted = time.perf_counter()
        job_id = submit(api, job_spec("bench-sweep", epochs=epochs, betas=[0.0, 1.0, 3.0, 6.0]))
        _succeeded(api, job_id)
        sweep_s = time.perf_counter() - posted
        job = api.get(f"/v1/jobs/{job_id}").json()
        trials = sorted(api.get(f"/v1/jobs/{job_id}/trials").json(), key=lambda t: t["key"])
        overheads, previous_end = [], seconds(job["started_at"])
        for trial in trials:
            end = seconds(trial["updated_at"])
            trained = sum(e["epoch_seconds"] for e in epochs_of(api, job_id, trial["key"]))
            overheads.append(end - previous_end - trained)
            print(f"  {code or 'this tree'} {trial['key']}: wall {end - previous_end:.1f} s, "
                  f"epochs {trained:.1f} s, overhead {overheads[-1]:.1f} s")  # fmt: skip
            previous_end = end
    return first_epoch, overheads, sweep_s


def _any_epoch(api: httpx.Client, job_id: str) -> bool:
    trials = api.get(f"/v1/jobs/{job_id}/trials").json()
    return any(epochs_of(api, job_id, t["key"]) for t in trials)


def _succeeded(api: httpx.Client, job_id: str) -> None:
    job = wait(lambda: finished(api, job_id), "the job to finish")
    assert job["status"] == "succeeded", job["error"]


if __name__ == "__main__":
    main()
