"""What routes are given: the settings, a database session, the job they name, and the
caller's credentials checked (the user's API token, or the worker token of that job)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import jobs
from service.auth import is_api_token, worker_token_job_id
from service.models import Job
from service.settings import Settings

if TYPE_CHECKING:  # the Ray client is imported only by servers that are given a cluster
    from service.ray_cluster import RayJobs

user_bearer = HTTPBearer(
    scheme_name="APIToken",
    description="ADVORCH_API_TOKEN, or the token in $ADVORCH_HOME/api_token",
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
    return jobs.get_job(session, job_id)


JobDep = Annotated[Job, Depends(get_job)]


def get_ray_jobs(request: Request) -> RayJobs:
    """The Ray Jobs client of the cluster jobs run on; an API replica given no cluster address
    serves everything but what only Ray has (the logs)."""
    ray_jobs: RayJobs | None = request.app.state.ray_jobs
    if ray_jobs is None:
        raise HTTPException(503, "this API server knows no Ray cluster: set ADVORCH_RAY_ADDRESS")
    return ray_jobs


RayJobsDep = Annotated["RayJobs", Depends(get_ray_jobs)]


def require_user(
    request: Request, credentials: Annotated[Credentials, Depends(user_bearer)]
) -> None:
    api_token: str = request.app.state.api_token
    if credentials is None or not is_api_token(credentials.credentials, api_token):
        raise _unauthorized("an API token is required: Authorization: Bearer <token>")


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
