"""The workers' HTTP client against a real (tiny, scripted) HTTP server: what it retries, what
it does not, and when it gives up."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from workers.reporter import JobClosed, Reporter, ReportRejected, ServiceUnavailable


class ScriptedService(ThreadingHTTPServer):
    """Answers each request with the next status of ``script`` (then 200), recording it."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script: list[int] = []
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedService

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append(
            {
                "method": self.command,
                "path": self.path,
                "auth": self.headers.get("Authorization"),
                "json": json.loads(body) if body else None,
            }
        )
        status = self.server.script.pop(0) if self.server.script else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"detail": "scripted"}')

    do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def service() -> Iterator[ScriptedService]:
    server = ScriptedService()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def reporter_for(url: str, max_wait_s: float = 30.0) -> Reporter:
    return Reporter(url, "job1", "job1.token", max_wait_s=max_wait_s)


def test_posts_to_the_jobs_internal_routes_with_the_worker_token(
    service: ScriptedService,
) -> None:
    reporter = reporter_for(service.url)
    reporter.job_event("running", reason="started")
    reporter.trial("trial_0000", config={"training.beta": 6.0}, status="running")
    reporter.epoch_metrics("trial_0000", {"epoch": 1, "train_loss": 0.5})

    assert [(r["method"], r["path"]) for r in service.requests] == [
        ("POST", "/v1/internal/jobs/job1/events"),
        ("PUT", "/v1/internal/jobs/job1/trials/trial_0000"),
        ("POST", "/v1/internal/jobs/job1/trials/trial_0000/metrics"),
    ]
    assert {r["auth"] for r in service.requests} == {"Bearer job1.token"}
    assert service.requests[0]["json"] == {"status": "running", "reason": "started", "error": None}
    assert service.requests[1]["json"]["config"] == {"training.beta": 6.0}


@pytest.mark.parametrize("status", [500, 503, 408, 429])
def test_retries_while_the_service_is_away(service: ScriptedService, status: int) -> None:
    service.script = [status, status]
    reporter_for(service.url).epoch_metrics("trial_0000", {"epoch": 1})
    assert len(service.requests) == 3
    assert service.requests[0]["json"] == service.requests[2]["json"]


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_does_not_retry_what_retrying_cannot_change(service: ScriptedService, status: int) -> None:
    service.script = [status]
    with pytest.raises(ReportRejected) as raised:
        reporter_for(service.url).trial("trial_0000", config={}, status="running")
    assert raised.value.status_code == status
    assert not isinstance(raised.value, JobClosed)
    assert len(service.requests) == 1


@pytest.mark.parametrize("status", [403, 409])
def test_forbidden_or_conflict_means_the_job_takes_no_more_reports(
    service: ScriptedService, status: int
) -> None:
    service.script = [status]
    with pytest.raises(JobClosed):
        reporter_for(service.url).job_event("succeeded", reason="done")
    assert len(service.requests) == 1


def test_gives_up_after_its_budget_when_nothing_answers() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ServiceUnavailable, match="not taken within"):
        reporter_for(url, max_wait_s=1.0).job_event("running", reason="started")


def test_sends_non_finite_numbers_as_null(service: ScriptedService) -> None:
    reporter_for(service.url).epoch_metrics("trial_0000", {"epoch": 1, "train_loss": float("nan")})
    assert service.requests[0]["json"] == {"epoch": 1, "train_loss": None}
