"""What routes are given: the settings, a database session, the job they name, and the
caller's credentials checked: a user's API token (whose user the route is given; a job of
another user is not found), or the worker token of that job.

Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` in a worker thread,
and that hop cost more than the work of most of them. Those that query the database are plain
``def`` (one thread hop each) and end their read transaction before they return
(:func:`end_read`), so that no request holds a pooled connection while it waits for a thread:
under hundreds of concurrent requests, threads waiting for connections held by requests waiting
for threads deadlocked the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service import jobs, users
from service.artifacts import ArtifactStore
from service.auth import worker_token_job_id
from service.models import ApiToken, Job, User
from service.settings import Settings

if TYPE_CHECKING:  # the Ray client is imported only by servers that are given a cluster
    from service.ray_cluster import RayJobs

user_bearer = HTTPBearer(
    scheme_name="APIToken",
    description=(
        "A user's token (POST /v1/users, POST /v1/users/{name}/tokens); the bootstrap admin's "
        "is ADVORCH_API_TOKEN, or the token in $ADVORCH_HOME/api_token"
    ),
    auto_error=False,
)
worker_bearer = HTTPBearer(
    scheme_name="WorkerToken",
    description="The job-scoped token the dispatcher hands to a job's workers",
    auto_error=False,
)
Credentials = HTTPAuthorizationCredentials | None


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_session_factory(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request. Making one does no I/O; closing one that still holds a
    connection (a transaction the route left open) does, so that happens in a thread. (It
    takes the request, not SessionFactoryDep: each dependency costs FastAPI work per request.)
    """
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def end_read(session: Session) -> None:
    """End the session's read transaction, giving its connection back to the pool from the
    thread that took it; what was loaded stays readable (sessions do not expire on commit)."""
    session.commit()


def get_open_job(job_id: str, session: SessionDep) -> Job:
    """The job a worker route names, while it has not ended: a worker token opens its job only
    until then (403 after), so a leaked token cannot rewrite a finished job's results."""
    job = jobs.get_open_job(session, job_id)
    end_read(session)
    return job


OpenJobDep = Annotated[Job, Depends(get_open_job)]


async def get_artifacts(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.artifacts
    return store


ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]


async def get_ray_jobs(request: Request) -> RayJobs:
    """The Ray Jobs client of the cluster jobs run on; an API replica given no cluster address
    serves everything but what only Ray has (the logs)."""
    ray_jobs: RayJobs | None = request.app.state.ray_jobs
    if ray_jobs is None:
        raise HTTPException(503, "this API server knows no Ray cluster: set ADVORCH_RAY_ADDRESS")
    return ray_jobs


RayJobsDep = Annotated["RayJobs", Depends(get_ray_jobs)]


async def get_token_cache(request: Request) -> users.TokenCache:
    cache: users.TokenCache = request.app.state.token_cache
    return cache


TokenCacheDep = Annotated[users.TokenCache, Depends(get_token_cache)]


async def current_token(
    request: Request, credentials: Annotated[Credentials, Depends(user_bearer)]
) -> ApiToken:
    """The caller's live token, with its user, detached and shared (read only): looked up in
    the database at most every ADVORCH_TOKEN_CACHE_S per token and API process, so a revoked
    token or a disabled user is refused that long after the change at most."""
    if credentials is None:
        raise _unauthorized("an API token is required: Authorization: Bearer <token>")
    cache: users.TokenCache = request.app.state.token_cache
    token = cache.cached(credentials.credentials)
    if token is None:
        token = await run_in_threadpool(cache.authenticate, credentials.credentials)
    if token is None:
        raise _unauthorized("this token is unknown, revoked, or its user is disabled")
    return token


CurrentTokenDep = Annotated[ApiToken, Depends(current_token)]


async def caller(token: CurrentTokenDep) -> User:
    """The caller, as the token cache holds them: detached and shared, for routes that only
    read who is asking (their id, name, whether an admin), with no per-request copy."""
    return token.user


CallerDep = Annotated[User, Depends(caller)]


async def current_user(token: CurrentTokenDep, session: SessionDep) -> User:
    """The caller, as this request's session's own copy (no query): routes may hand it to
    writes, which the cached, shared one must never be."""
    return session.merge(token.user, load=False)


CurrentUserDep = Annotated[User, Depends(current_user)]


async def require_admin(user: CurrentUserDep) -> User:
    if not user.is_admin:
        raise HTTPException(403, "only admins may do this")
    return user


AdminDep = Annotated[User, Depends(require_admin)]


def get_visible_job(job_id: str, session: SessionDep, user: CallerDep) -> Job:
    """The job a user route names, with its trials and owner (one query), if the caller may
    see it: another user's job is a 404."""
    job = jobs.get_job(session, job_id, visible_to=user, with_trials=True)
    end_read(session)
    return job


VisibleJobDep = Annotated[Job, Depends(get_visible_job)]


async def require_worker(
    job_id: str, settings: SettingsDep, credentials: Annotated[Credentials, Depends(worker_bearer)]
) -> None:
    """Only the worker token of job ``job_id`` opens its internal routes."""
    if credentials is None:
        raise _unauthorized("a worker token is required: Authorization: Bearer <token>")
    token_job_id = worker_token_job_id(settings, credentials.credentials)
    if token_job_id is None:
        raise _unauthorized("not a worker token")
    if token_job_id != job_id:
        raise HTTPException(403, f"this worker token is for another job, not {job_id!r}")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


async def known_query_parameters_only(request: Request) -> None:
    """Refuse query parameters the route does not take (422 naming each), as the job spec
    refuses unknown fields: a misspelt ``?stauts=failed`` must not silently list every job."""
    if not request.scope.get("query_string"):
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _known_query_parameters(route, dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestValidationError(
            [
                {"loc": ("query", name), "msg": "unknown query parameter", "type": "extra"}
                for name in unknown
            ]
        )


# Each route's query parameters, found once: by the route's id, with the route itself kept
# so that its id cannot be reused (routes live as long as the app anyway).
_known_by_route: dict[int, tuple[object, frozenset[str]]] = {}


def _known_query_parameters(route: object, dependant: Dependant) -> frozenset[str]:
    entry = _known_by_route.get(id(route))
    if entry is None:
        entry = _known_by_route[id(route)] = (route, frozenset(_query_parameter_names(dependant)))
    return entry[1]


def _query_parameter_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _query_parameter_names(dependency)
    return names
