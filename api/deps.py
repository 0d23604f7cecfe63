"""What routes are given: the settings, a database session, the job they name, and the
caller's credentials checked: a user's API token (whose user the route is given; a job of
another user is not found), or the worker token of that job."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

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


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_job(job_id: str, session: SessionDep) -> Job:
    """The job a worker route names (its worker token was checked for that very job)."""
    return jobs.get_job(session, job_id)


def get_open_job(job_id: str, session: SessionDep) -> Job:
    """The job a worker route names, while it has not ended: a worker token opens its job only
    until then (403 after), so a leaked token cannot rewrite a finished job's results."""
    job = jobs.get_job(session, job_id)
    jobs.ensure_open(job)
    return job


OpenJobDep = Annotated[Job, Depends(get_open_job)]


def get_artifacts(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.artifacts
    return store


ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]


JobDep = Annotated[Job, Depends(get_job)]


def get_ray_jobs(request: Request) -> RayJobs:
    """The Ray Jobs client of the cluster jobs run on; an API replica given no cluster address
    serves everything but what only Ray has (the logs)."""
    ray_jobs: RayJobs | None = request.app.state.ray_jobs
    if ray_jobs is None:
        raise HTTPException(503, "this API server knows no Ray cluster: set ADVORCH_RAY_ADDRESS")
    return ray_jobs


RayJobsDep = Annotated["RayJobs", Depends(get_ray_jobs)]


def current_token(
    session: SessionDep, credentials: Annotated[Credentials, Depends(user_bearer)]
) -> ApiToken:
    """The caller's live token, with its user: checked on every request, so a revoked token or
    a disabled user is refused at once."""
    if credentials is None:
        raise _unauthorized("an API token is required: Authorization: Bearer <token>")
    token = users.authenticate(session, credentials.credentials)
    if token is None:
        raise _unauthorized("this token is unknown, revoked, or its user is disabled")
    return token


CurrentTokenDep = Annotated[ApiToken, Depends(current_token)]


def current_user(token: CurrentTokenDep) -> User:
    return token.user


CurrentUserDep = Annotated[User, Depends(current_user)]


def require_admin(user: CurrentUserDep) -> User:
    if not user.is_admin:
        raise HTTPException(403, "only admins may do this")
    return user


AdminDep = Annotated[User, Depends(require_admin)]


def get_visible_job(job_id: str, session: SessionDep, user: CurrentUserDep) -> Job:
    """The job a user route names, if the caller may see it: another user's job is a 404."""
    return jobs.get_job(session, job_id, visible_to=user)


VisibleJobDep = Annotated[Job, Depends(get_visible_job)]


def require_worker(
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


def known_query_parameters_only(request: Request) -> None:
    """Refuse query parameters the route does not take (422 naming each), as the job spec
    refuses unknown fields: a misspelt ``?stauts=failed`` must not silently list every job."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _query_parameter_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestValidationError(
            [
                {"loc": ("query", name), "msg": "unknown query parameter", "type": "extra"}
                for name in unknown
            ]
        )


def _query_parameter_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _query_parameter_names(dependency)
    return names
