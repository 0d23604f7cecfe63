"""What advorch exposes to Prometheus (``GET /metrics``).

Counters and histograms of this process live in prometheus_client's default registry; the
gauges of jobs by status and trials by status are read from the database at scrape time, so
every API replica reports the same, true numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.models import Job, JobStatus, Trial, TrialStatus

HTTP_REQUESTS = Counter(
    "advorch_http_requests_total",
    "HTTP requests served, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "advorch_http_request_duration_seconds",
    "Time to serve an HTTP request, by method and route template.",
    ["method", "route"],
)
DISPATCH_LATENCY = Histogram(
    "advorch_dispatch_latency_seconds",
    "Time from a job's submission over REST to its Ray Job being submitted.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
EPOCH_METRICS_POSTED = Counter(
    "advorch_epoch_metrics_posted_total", "Per-epoch metric reports posted by workers."
)


class DatabaseCollector(Collector):
    """Jobs by status and trials by status, counted in the database when scraped."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield self._by_status("advorch_jobs", "Jobs by status.", Job.status, JobStatus)
        yield self._by_status("advorch_trials", "Trials by status.", Trial.status, TrialStatus)

    def _by_status(
        self,
        name: str,
        documentation: str,
        column: InstrumentedAttribute[JobStatus] | InstrumentedAttribute[TrialStatus],
        statuses: type[JobStatus] | type[TrialStatus],
    ) -> GaugeMetricFamily:
        rows = self._session.execute(select(column, func.count()).group_by(column))
        counts: dict[str, int] = {str(status): count for status, count in rows}
        gauge = GaugeMetricFamily(name, documentation, labels=["status"])
        for status in statuses:
            gauge.add_metric([status.value], counts.get(status, 0))
        return gauge
