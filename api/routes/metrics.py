"""Prometheus metrics (``GET /metrics``): the service's counters and histograms, and the jobs
and trials by status as the database has them now. No token: scrapers sit inside the cluster.

Under ``advorch serve`` the counters are summed over its processes (every API worker and the
dispatcher's), which keep them in PROMETHEUS_MULTIPROC_DIR (service.api_workers); a bare
``uvicorn api.main:app`` reports its own process's.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from api.deps import SessionDep
from service.api_workers import PROMETHEUS_DIR_ENV
from service.metrics import DatabaseCollector

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response)
def metrics(session: SessionDep) -> Response:
    if PROMETHEUS_DIR_ENV in os.environ:
        counters = CollectorRegistry()
        MultiProcessCollector(counters)
    else:
        counters = REGISTRY
    from_database = CollectorRegistry()
    from_database.register(DatabaseCollector(session))
    body = generate_latest(counters) + generate_latest(from_database)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
