"""A real ``advorch serve`` for the benchmarks: the embedded default (SQLite, a local Ray head)
in a temporary ADVORCH_HOME, and an HTTP client of it with the admin's token.

``code`` runs another checkout's code (a git worktree of an older revision) with this
virtualenv: the service, its Ray head and every Ray worker import from there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
ENDED = ("succeeded", "failed", "cancelled")


@contextmanager
def running_service(code: Path | None = None, **settings: str) -> Iterator[httpx.Client]:
    with tempfile.TemporaryDirectory(prefix="advorch-bench-") as home:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ADVORCH_", "RAY_"))}
        env |= {"ADVORCH_HOME": home, "ADVORCH_PORT": str(port), **settings}
        command = [sys.executable, "-c", "from service.cli import main; main()", "serve"]
        if code is not None:
            env["PYTHONPATH"] = str(code)
        with (Path(home) / "serve.log").open("wb") as log:
            server = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=code)
        try:
            url = f"http://127.0.0.1:{port}"
            wait(lambda: _healthy(url), "the service", timeout_s=180)
            token = (Path(home) / "api_token").read_text().strip()
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
            ) as api:
                yield api
        finally:
            server.terminate()
            server.wait(60)


def submit(api: httpx.Client, spec: dict[str, Any]) -> str:
    return str(api.post("/v1/jobs", json=spec).raise_for_status().json()["id"])


def finished(api: httpx.Client, job_id: str) -> dict[str, Any] | None:
    """The job once it has ended, else None (a probe for :func:`wait`)."""
    job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] in ENDED else None


def epochs_of(api: httpx.Client, job_id: str, trial_key: str) -> list[dict[str, Any]]:
    metrics: list[dict[str, Any]] = api.get(f"/v1/jobs/{job_id}/trials/{trial_key}/metrics").json()
    return metrics


def wait(
    probe: Callable[[], T | None], what: str, timeout_s: float = 1800, poll_s: float = 0.5
) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"no {what} within {timeout_s:.0f} s")


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz").status_code == 200
    except httpx.TransportError:
        return False
