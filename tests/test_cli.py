"""The ``advorch`` CLI as users run it: a real subprocess talking to a live server over HTTP,
reading the URL and the token from the same settings and token file as the server. Workers
are played through the internal routes (the Ray tests run the real ones)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from tests.conftest import LiveServer, play_workers
from workers.models import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SWEEP_EXAMPLE = ROOT / "examples" / "trades_beta_sweep.yaml"


@pytest.fixture
def advorch(live_server: LiveServer) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``advorch ARGS`` against the live server, as a user whose ADVORCH_HOME it shares."""
    env = {
        **os.environ,
        "ADVORCH_HOME": str(live_server.settings.home),
        "ADVORCH_PUBLIC_URL": live_server.url,
        "COLUMNS": "200",  # tables whole, not folded to 80 columns
    }
    env.pop("ADVORCH_API_TOKEN", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", "from service.cli import main; main()", *args]
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
        )

    return run


def test_submit_with_overrides_then_read_everything_back(
    advorch: Callable[..., subprocess.CompletedProcess[str]],
    api: httpx.Client,
    dispatch: Callable[[str], httpx.Client],
    storage_dir: Path,
    tmp_path: Path,
) -> None:
    submitted = advorch(
        "submit",
        str(SWEEP_EXAMPLE),
        "--set",
        "training.epochs=3",
        "--set",
        "sweep.parameters={training.beta: {grid: [0.0, 6.0]}}",
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted job ")[1].split()[0]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["spec"]["training"]["epochs"] == 3  # the override, YAML-typed
    assert job["num_trials"] == 2

    play_workers(
        dispatch(job_id),
        job_id,
        {"trial_0000": (0.0, 0.97, 0.40), "trial_0001": (6.0, 0.95, 0.80)},
        storage=storage_dir,
    )

    listing = advorch("jobs")
    assert job_id in listing.stdout and "succeeded" in listing.stdout and "80.0%" in listing.stdout
    results = advorch("results", job_id)
    assert results.returncode == 0, results.stderr
    best_line = next(line for line in results.stdout.splitlines() if "★" in line)
    assert "trial_0001" in best_line and "beta=6.0" in best_line and "95.0%" in best_line
    status = advorch("status", job_id)
    assert "trials 2/2 done" in status.stdout and "best robust 80.0%" in status.stdout

    plot = tmp_path / "tradeoff.png"
    tradeoff = advorch("tradeoff", job_id, "--plot", str(plot))
    assert tradeoff.returncode == 0, tradeoff.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    downloaded = tmp_path / "best.pt"
    assert advorch("checkpoint", job_id, "trial_0001", "-o", str(downloaded)).returncode == 0
    model = load_checkpoint(downloaded)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_wait_follows_the_job_to_its_end_and_exits_by_its_outcome(
    advorch: Callable[..., subprocess.CompletedProcess[str]],
    api: httpx.Client,
    dispatch: Callable[[str], httpx.Client],
    storage_dir: Path,
    tmp_path: Path,
) -> None:
    spec = yaml.safe_load(SWEEP_EXAMPLE.read_text())
    spec["name"] = "cli-wait"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))

    def play_the_workers() -> None:
        job_id = _wait_for_queued_job(api, "cli-wait")
        results = {
            f"trial_000{i}": (beta, 0.9, 0.5 + i / 10)
            for i, beta in enumerate([0.0, 1.0, 3.0, 6.0])
        }
        play_workers(dispatch(job_id), job_id, results, storage=storage_dir)

    workers = threading.Thread(target=play_the_workers)
    workers.start()
    waited = advorch("submit", str(spec_file), "--wait")
    workers.join()
    assert waited.returncode == 0, waited.stderr
    assert "(succeeded)" in waited.stdout and "trials 4/4 done" in waited.stdout


def test_a_failed_job_makes_wait_exit_non_zero(
    advorch: Callable[..., subprocess.CompletedProcess[str]],
    submit: Callable[..., dict[str, Any]],
    dispatch: Callable[[str], httpx.Client],
) -> None:
    job_id = submit(name="to-fail")["id"]
    dispatch(job_id).post(
        f"/v1/internal/jobs/{job_id}/events",
        json={"status": "failed", "reason": "r", "error": "out of memory"},
    )
    watched = advorch("status", job_id, "--watch")
    assert watched.returncode == 1
    assert "out of memory" in watched.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("status", "no-such-job"), "no job 'no-such-job'"),
        (("submit", str(SWEEP_EXAMPLE), "--set", "training.epsilon=3"), "training.epsilon"),
        (("logs", "no-such-job"), "no job 'no-such-job'"),
    ],
)
def test_api_errors_are_one_line_and_exit_non_zero(
    advorch: Callable[..., subprocess.CompletedProcess[str]], args: tuple[str, ...], message: str
) -> None:
    result = advorch(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_logs_need_a_ray_cluster(
    advorch: Callable[..., subprocess.CompletedProcess[str]], submit: Callable[..., dict[str, Any]]
) -> None:
    # This API server was given no Ray cluster: it says so rather than guessing.
    result = advorch("logs", submit(name="no-ray")["id"])
    assert result.returncode == 1
    assert "ADVORCH_RAY_ADDRESS" in result.stderr


def _wait_for_queued_job(api: httpx.Client, name: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in api.get("/v1/jobs", params={"status": "queued"}).json()["items"]:
            if job["name"] == name:
                return str(job["id"])
        time.sleep(0.1)
    raise AssertionError(f"no queued job {name!r} appeared")
