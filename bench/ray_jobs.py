"""Time what running on Ray adds to a job, through the REST API of a real ``advorch serve``
(the embedded default: SQLite and a local Ray head, in a temporary ADVORCH_HOME):

- latency: from ``POST /v1/jobs`` to the job running (dispatched, its entrypoint up) and to
  the first epoch's metrics being readable through the API;
- per-trial overhead: a trial's wall time (from its first report, made as its Tune trial
  starts, to its final results) minus the sum of its epochs' ``epoch_seconds``. It holds the
  Ray Train start (controller, worker group, process group), loading the data, the final test
  evaluation and the reports.

    python bench/ray_jobs.py                                  # 3-trial beta sweep, 3 epochs
    python bench/ray_jobs.py --epochs 3 --max-concurrent 1    # trials one at a time
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.0, 6.0])
    parser.add_argument("--max-concurrent", type=int, default=2)
    args = parser.parse_args()

    spec = {
        "name": "bench-ray-jobs",
        "dataset": {"name": "digits"},
        "model": {"arch": "small_cnn"},
        "training": {"method": "trades", "epochs": args.epochs, "batch_size": 64,
                     "epsilon": 0.1, "attack_steps": 2},
        "evaluation": {"attack_steps": 3},
        "sweep": {"parameters": {"training.beta": {"grid": args.betas}},
                  "max_concurrent_trials": args.max_concurrent},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="advorch-bench-") as home:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ADVORCH_", "RAY_"))}
        env |= {"ADVORCH_HOME": home, "ADVORCH_PORT": str(port)}
        advorch = Path(sys.executable).parent / "advorch"
        with (Path(home) / "serve.log").open("wb") as log:
            server = subprocess.Popen([advorch, "serve"], env=env, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: _healthy(url), "the service")
            token = (Path(home) / "api_token").read_text().strip()
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
                measure(api, spec)
        finally:
            server.terminate()
            server.wait(60)


def measure(api: httpx.Client, spec: dict[str, Any]) -> None:
    posted = time.perf_counter()
    job_id = api.post("/v1/jobs", json=spec).raise_for_status().json()["id"]
    _wait(lambda: _epoch_rows(api, job_id), "the first epoch's metrics", poll_s=0.1)
    first_epoch = time.perf_counter() - posted
    job = _wait(lambda: _finished(api, job_id), "the job to finish")
    total = time.perf_counter() - posted
    assert job["status"] == "succeeded", job["error"]

    overheads = []
    for trial in api.get(f"/v1/jobs/{job_id}/trials").json():
        epochs = api.get(f"/v1/jobs/{job_id}/trials/{trial['key']}/metrics").json()
        wall = _seconds(trial["updated_at"]) - _seconds(trial["created_at"])
        trained = sum(e["epoch_seconds"] for e in epochs)
        overheads.append(wall - trained)
        print(f"{trial['key']} {trial['config']}: wall {wall:.1f} s, epochs {trained:.1f} s, "
              f"overhead {wall - trained:.1f} s")  # fmt: skip
    started = _seconds(job["started_at"]) - _seconds(job["created_at"])
    print(f"POST -> job running (dispatched, entrypoint up): {started:.1f} s")
    print(f"POST -> first epoch's metrics readable: {first_epoch:.1f} s")
    print(f"POST -> job succeeded: {total:.1f} s ({len(overheads)} trials, "
          f"{spec['sweep']['max_concurrent_trials']} at a time)")  # fmt: skip
    print(f"per-trial overhead: median {statistics.median(overheads):.1f} s, "
          f"min {min(overheads):.1f} s, max {max(overheads):.1f} s")  # fmt: skip


def _epoch_rows(api: httpx.Client, job_id: str) -> bool:
    trials = api.get(f"/v1/jobs/{job_id}/trials").json()
    return any(api.get(f"/v1/jobs/{job_id}/trials/{t['key']}/metrics").json() for t in trials)


def _finished(api: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] in ("succeeded", "failed", "cancelled") else None


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _wait(probe: Any, what: str, timeout_s: float = 900, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"no {what} within {timeout_s:.0f} s")


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


if __name__ == "__main__":
    main()
