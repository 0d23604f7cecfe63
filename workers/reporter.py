"""Posting results to the service's internal routes: the only way a job's workers talk to it.

    reporter = Reporter.for_job(JobEnv.from_environ())
    reporter.job_event("running", reason="the sweep started")
    reporter.trial("trial_0000", config={"training.beta": 6.0}, status="running")
    reporter.epoch_metrics("trial_0000", {"epoch": 1, "val_robust_acc": 0.41, ...})
    reporter.upload_checkpoint("trial_0000", Path("best.pt"), epoch=1)

Every internal route is idempotent, so a request that did not get through is simply sent
again: connection errors, timeouts, 5xx, 408 and 429 are retried with exponential backoff for
up to ``max_wait_s`` (the service may be restarting), and only then given up. Any other 4xx is
an answer, not an outage, and is raised at once: 403 and 409 (``JobClosed``) mean the job takes
no more reports (a user cancelled it, or it has ended), anything else means what was sent is
wrong. Files travel with their SHA-256, which the receiving side checks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from workers.job_env import JobEnv

log = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({408, 429})
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0
# Long enough for the service to be restarted (or to move to another host) mid-sweep.
DEFAULT_MAX_WAIT_S = 300.0


class ServiceUnavailable(RuntimeError):
    """The service did not take a report within the retry budget."""


class ReportRejected(RuntimeError):
    """The service answered a report with a 4xx that retrying cannot change."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class JobClosed(ReportRejected):
    """403 or 409: the job takes no more reports (it was cancelled, or has already ended)."""


# The answers that mean the job takes no more reports from its workers.
CLOSED_STATUSES = frozenset({403, 409})


class Reporter:
    def __init__(
        self,
        service_url: str,
        job_id: str,
        worker_token: str,
        *,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        timeout_s: float = 10.0,
    ) -> None:
        self.job_id = job_id
        self.max_wait_s = max_wait_s
        self._client = httpx.Client(
            base_url=f"{service_url.rstrip('/')}/v1/internal/jobs/{job_id}",
            headers={"Authorization": f"Bearer {worker_token}"},
            timeout=timeout_s,
        )

    @classmethod
    def for_job(cls, env: JobEnv, **options: Any) -> Reporter:
        return cls(env.service_url, env.job_id, env.worker_token, **options)

    def job_event(self, status: str, reason: str, error: str | None = None) -> None:
        """The job's status: ``running``, ``succeeded`` or ``failed`` (with the error)."""
        self._send("POST", "/events", json={"status": status, "reason": reason, "error": error})

    def trial(
        self,
        trial_key: str,
        *,
        config: Mapping[str, Any],
        status: str | None = None,
        error: str | None = None,
        **results: Any,
    ) -> None:
        """Create or update a trial; what is left out (or None) is left as the service has it.
        ``results``: clean_acc, robust_acc, autoattack_acc, autoattack, best_epoch,
        val_clean_acc, val_robust_acc, weights ("trained" or "ema"), reason."""
        body = {"config": dict(config), "status": status, "error": error, **results}
        self._send("PUT", f"/trials/{trial_key}", json=body)

    def epoch_metrics(self, trial_key: str, metrics: Mapping[str, float]) -> None:
        """One epoch's metrics (with ``epoch``) of a trial."""
        self._send("POST", f"/trials/{trial_key}/metrics", json=dict(metrics))

    def curve_point(self, trial_key: str, point: Mapping[str, Any]) -> None:
        """A point (with ``epsilon``) of an evaluate job's robustness curve."""
        self._send("POST", f"/trials/{trial_key}/curve", json=dict(point))

    def upload_checkpoint(self, trial_key: str, path: Path, *, epoch: int) -> None:
        """A trial's best model so far (of best epoch ``epoch``), streamed with its SHA-256."""
        sha256 = file_sha256(path)
        self._send(
            "PUT",
            f"/trials/{trial_key}/checkpoint",
            params={"epoch": epoch},
            headers={"X-Content-SHA256": sha256},
            content=lambda: path.open("rb"),
        )

    def download_source(self, destination: Path) -> Path:
        """The model file this evaluate job attacks, written to ``destination``."""
        destination.parent.mkdir(parents=True, exist_ok=True)

        def save(response: httpx.Response) -> None:
            with destination.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)

        self._send("GET", "/source", on_response=save)
        return destination

    def close(self) -> None:
        self._client.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        content: Callable[[], IO[bytes]] | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        on_response: Callable[[httpx.Response], None] | None = None,
    ) -> None:
        """One request, retried while the service is away; ``content`` opens a fresh body for
        each try, ``on_response`` reads a successful response while it streams."""
        if json is not None:
            json = {key: _json_number(value) for key, value in json.items()}
        deadline = time.monotonic() + self.max_wait_s
        delay = FIRST_DELAY_S
        while True:
            try:
                body = content() if content is not None else None
                try:
                    request = self._client.build_request(
                        method, path, json=json, content=body, params=params, headers=headers
                    )
                    response = self._client.send(request, stream=True)
                    try:
                        status = response.status_code
                        if status < 400 and on_response is not None:
                            on_response(response)
                        else:
                            response.read()
                    finally:
                        response.close()
                finally:
                    if body is not None:
                        body.close()
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if status < 400:
                    return
                if status in CLOSED_STATUSES:
                    raise JobClosed(status, f"{method} {path}: {response.text}")
                if status < 500 and status not in RETRIED_STATUSES:
                    raise ReportRejected(status, f"{method} {path}: {status} {response.text}")
                problem = f"HTTP {status}"
            if time.monotonic() + delay > deadline:
                raise ServiceUnavailable(
                    f"{method} {path} not taken within {self.max_wait_s:.0f} s: {problem}"
                )
            log.warning("%s %s: %s; retrying in %.1f s", method, path, problem, delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_DELAY_S)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _json_number(value: Any) -> Any:
    """JSON has no NaN or infinity (a diverged loss): they are sent as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
