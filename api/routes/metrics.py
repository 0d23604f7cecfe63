"""Prometheus metrics (``GET /metrics``): this process's counters and histograms, and the jobs
and trials by status as the database has them now. No token: scrapers sit inside the cluster."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from api.deps import SessionDep
from service.metrics import DatabaseCollector

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response)
def metrics(session: SessionDep) -> Response:
    from_database = CollectorRegistry()
    from_database.register(DatabaseCollector(session))
    body = generate_latest(REGISTRY) + generate_latest(from_database)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
