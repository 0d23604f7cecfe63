"""The user routes: submit jobs and read back everything about them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from fastapi.responses import FileResponse

from api.deps import JobDep, RayJobsDep, SessionDep, SettingsDep, require_user
from api.errors import error_responses
from api.schemas import (
    EpochMetricsPublic,
    JobEventPublic,
    JobLogs,
    JobPage,
    JobPublic,
    TradeoffPublic,
    TrialKey,
    TrialPublic,
)
from service import jobs
from service.models import JobStatus
from workers.spec import JobSpec

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_user)],
    responses=error_responses(401, 404, 409, 413, 422),
)


@router.post("", status_code=status.HTTP_201_CREATED)
def submit_job(spec: JobSpec, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """Queue a job; the response holds the spec as resolved (defaults filled)."""
    return JobPublic.from_job(jobs.create_job(session, spec, settings))


@router.get("")
def list_jobs(
    session: SessionDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobPage:
    """Jobs, newest first, optionally of one status."""
    page, total = jobs.list_jobs(session, status=status, limit=limit, offset=offset)
    items = [JobPublic.from_job(job) for job in page]
    return JobPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}")
def read_job(job: JobDep) -> JobPublic:
    return JobPublic.from_job(job)


@router.post("/{job_id}/cancel")
def cancel_job(job: JobDep, session: SessionDep) -> JobPublic:
    """Cancel a job that has not finished; it is stopped on Ray in the background."""
    return JobPublic.from_job(jobs.cancel_job(session, job))


@router.get("/{job_id}/events")
def list_job_events(job: JobDep) -> list[JobEventPublic]:
    """Every status change of the job, with its time and reason, oldest first."""
    return [JobEventPublic.model_validate(event) for event in job.events]


@router.get("/{job_id}/trials")
def list_trials(job: JobDep) -> list[TrialPublic]:
    return [TrialPublic.model_validate(trial) for trial in job.trials]


@router.get("/{job_id}/trials/{trial_key}/metrics")
def list_trial_metrics(
    job: JobDep, trial_key: TrialKey, session: SessionDep
) -> list[EpochMetricsPublic]:
    """The trial's metrics, one entry per epoch, in order."""
    trial = jobs.get_trial(session, job, trial_key)
    return [EpochMetricsPublic.model_validate(row) for row in trial.metrics]


@router.get(
    "/{job_id}/trials/{trial_key}/checkpoint",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_checkpoint(
    job: JobDep, trial_key: TrialKey, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    """The trial's best checkpoint, loadable by ``workers.models.load_checkpoint``."""
    path = jobs.checkpoint_path(jobs.get_trial(session, job, trial_key), settings)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{trial_key}.pt")


@router.get("/{job_id}/logs")
def read_job_logs(job: JobDep, ray_jobs: RayJobsDep) -> JobLogs:
    """The job's Ray Job log: its driver's output, the Tune progress and any error."""
    return JobLogs(logs=jobs.ray_logs(job, ray_jobs.logs))


@router.get("/{job_id}/tradeoff")
def read_tradeoff(job: JobDep) -> TradeoffPublic:
    """Clean against robust accuracy of every finished trial, with the Pareto front."""
    return TradeoffPublic.from_job(job)
