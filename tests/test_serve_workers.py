"""``advorch serve`` with several API worker processes (ADVORCH_API_WORKERS): every worker
serves, the database is migrated once (by the parent), and a worker that dies is started again.
No Ray here: ADVORCH_RAY_ADDRESS names a port where nothing listens. That SIGTERM and SIGKILL
of the service leave none of its workers behind, nor its Ray head, is tested with the head, in
test_ray_jobs.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from service.api_workers import MIN_WORKER_UPTIME_S
from tests.conftest import bearer
from tests.ray_support import Service, clean_environment, free_port, process_tree, wait_for

ADMIN_TOKEN = "workers-admin-token"


def start(home: Path, workers: int = 2) -> Service:
    env = clean_environment() | {
        "ADVORCH_API_WORKERS": str(workers),
        "ADVORCH_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",
        "ADVORCH_API_TOKEN": ADMIN_TOKEN,
        "ADVORCH_DISPATCH_INTERVAL_S": "30",
    }
    service = Service(home=home, env=env)
    service.start()
    return service


def api_workers(service: Service) -> list[int]:
    assert service.process is not None
    return sorted(
        pid
        for pid, command in process_tree(service.process.pid).items()
        if "multiprocessing" in command and "resource_tracker" not in command
    )


def answers(service: Service) -> bool:
    """A request on a new connection is served (by whichever worker accepts it)."""
    try:
        return httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def healthz_served(metrics: str) -> float:
    """The count of /healthz requests answered 200, as /metrics says."""
    for line in metrics.splitlines():
        labels = 'route="/healthz"' in line and 'status="200"' in line
        if line.startswith("advorch_http_requests_total{") and labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_worker_serves_the_database_is_migrated_once_and_a_dead_worker_is_replaced(
    tmp_path: Path,
) -> None:
    service = start(tmp_path)
    try:
        workers = api_workers(service)
        assert len(workers) == 2
        started_at = time.monotonic()
        # Each worker alone (the other stopped) answers: both accept on the shared socket.
        first, second = workers
        for stopped, serving in ((first, second), (second, first)):
            os.kill(stopped, signal.SIGSTOP)
            try:
                assert all(answers(service) for _ in range(5)), f"worker {serving} did not serve"
                if stopped == second:
                    # Served by the first worker alone: yet it counts the second's requests too.
                    metrics = httpx.get(f"{service.url}/metrics", timeout=5).text
            finally:
                os.kill(stopped, signal.SIGCONT)
        assert healthz_served(metrics) >= 10
        with httpx.Client(base_url=service.url, headers=bearer(ADMIN_TOKEN)) as api:
            assert api.get("/v1/me").json()["name"] == "admin"  # made once, by the parent

        log = (tmp_path / "serve.log").read_text()
        # Alembic says this once per migration run; the workers log at INFO as the parent does.
        assert log.count("Context impl SQLiteImpl") == 1, log
        assert log.count("Running upgrade  -> 0001") == 1
        assert log.count("Application startup complete") == 2

        # A worker that dies is started again (one dying at once would stop the service).
        time.sleep(max(0.0, MIN_WORKER_UPTIME_S + 0.5 - (time.monotonic() - started_at)))
        os.kill(first, signal.SIGKILL)
        wait_for(
            "a new worker",
            lambda: len(api_workers(service)) == 2 and first not in api_workers(service),
            30,
        )
        assert second in api_workers(service)
        assert answers(service)
        assert "starting it again" in (tmp_path / "serve.log").read_text()
    finally:
        service.stop_if_running()
