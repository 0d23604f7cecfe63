"""Posting results to the service's internal routes: the only way a job's workers talk to it.

    reporter = Reporter.for_job(JobEnv.from_environ())
    reporter.job_event("running", reason="the sweep started")
    reporter.trial("trial_0000", config={"training.beta": 6.0}, status="running")
    reporter.epoch_metrics("trial_0000", {"epoch": 1, "val_robust_acc": 0.41, ...})

Every internal route is idempotent, so a post that did not get through is simply sent again:
connection errors, timeouts, 5xx, 408 and 429 are retried with exponential backoff for up to
``max_wait_s`` (the service may be restarting), and only then given up. Any other 4xx is an
answer, not an outage, and is raised at once: 409 (``JobClosed``) means the job takes no more
reports (a user cancelled it), anything else means what was sent is wrong.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

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
    """409: the job takes no more reports (it was cancelled, or has already ended)."""


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
        self._send("POST", "/events", {"status": status, "reason": reason, "error": error})

    def trial(
        self,
        trial_key: str,
        *,
        config: Mapping[str, Any],
        status: str | None = None,
        clean_acc: float | None = None,
        robust_acc: float | None = None,
        best_epoch: int | None = None,
        checkpoint_uri: str | None = None,
        error: str | None = None,
    ) -> None:
        """Create or update a trial; what is left None is left as the service has it."""
        body = {
            "config": dict(config),
            "status": status,
            "clean_acc": clean_acc,
            "robust_acc": robust_acc,
            "best_epoch": best_epoch,
            "checkpoint_uri": checkpoint_uri,
            "error": error,
        }
        self._send("PUT", f"/trials/{trial_key}", body)

    def epoch_metrics(self, trial_key: str, metrics: Mapping[str, float]) -> None:
        """One epoch's metrics (with ``epoch``) of a trial."""
        self._send("POST", f"/trials/{trial_key}/metrics", dict(metrics))

    def close(self) -> None:
        self._client.close()

    def _send(self, method: str, path: str, body: dict[str, Any]) -> None:
        body = {key: _json_number(value) for key, value in body.items()}
        deadline = time.monotonic() + self.max_wait_s
        delay = FIRST_DELAY_S
        while True:
            try:
                response = self._client.request(method, path, json=body)
            except httpx.TransportError as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                status = response.status_code
                if status < 400:
                    return
                if status == 409:
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


def _json_number(value: Any) -> Any:
    """JSON has no NaN or infinity (a diverged loss): they are sent as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
