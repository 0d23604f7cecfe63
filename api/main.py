"""The ASGI app: ``uvicorn api.main:app``. It needs no Ray: the dispatcher runs beside it, so
API replicas scale apart from it.

On start it brings the database to the newest schema, makes sure there is an API token, and
makes it the bootstrap admin's (the user named ``admin``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI

from api.body_limit import BodySizeLimit
from api.deps import known_query_parameters_only
from api.errors import error_responses, install_error_handlers
from api.request_metrics import RequestMetrics
from api.response_cache import JobPageCache
from api.routes import audit, health, internal, jobs, metrics, models, users, web
from service.artifacts import ArtifactStore
from service.auth import ensure_api_token
from service.db import engine_from_settings, make_session_factory, upgrade_database
from service.settings import Settings, get_settings
from service.users import TokenCache, ensure_bootstrap_admin

if TYPE_CHECKING:
    from service.ray_cluster import RayJobs


def create_app(
    settings: Settings | None = None,
    ray_jobs: RayJobs | None = None,
    *,
    prepare_database: bool = True,
) -> FastAPI:
    """The app; ``ray_jobs`` is the client of the cluster jobs run on (``advorch serve`` passes
    its own), else one for ``ADVORCH_RAY_ADDRESS`` when set, else none: the API then runs
    without Ray, and only the logs route answers 503. ``prepare_database=False``: the caller
    has migrated the database and made the bootstrap admin already (``advorch serve`` does,
    once, before it starts its API workers)."""
    settings = settings or get_settings()
    if ray_jobs is None and settings.ray_address is not None:
        from service.ray_cluster import RayJobs, cluster_auth_token

        ray_jobs = RayJobs(settings.ray_address, cluster_auth_token())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if prepare_database:
            upgrade_database(settings.resolved_database_url, settings.db_connect_timeout_s)
        engine = engine_from_settings(settings)
        app.state.session_factory = make_session_factory(engine)
        app.state.token_cache = TokenCache(app.state.session_factory, settings.token_cache_s)
        if prepare_database:
            with app.state.session_factory() as session:
                ensure_bootstrap_admin(session, ensure_api_token(settings))
        yield
        engine.dispose()

    app = FastAPI(
        title="advorch",
        summary="Adversarial training jobs (PGD-AT, TRADES) on Ray, over REST.",
        version=version("advorch"),
        lifespan=lifespan,
        # Any route may find a body it cannot parse (400).
        responses=error_responses(400),
        dependencies=[Depends(known_query_parameters_only)],
    )
    app.state.settings = settings
    app.state.ray_jobs = ray_jobs
    app.state.artifacts = ArtifactStore(settings.resolved_artifacts)
    app.state.job_pages = JobPageCache()
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(RequestMetrics)
    app.include_router(web.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(users.router)
    app.include_router(audit.router)
    app.include_router(internal.router)
    return app


app = create_app()
