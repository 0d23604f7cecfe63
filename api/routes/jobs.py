"""The user routes: submit jobs and read back everything about them. A user sees and acts on
their own jobs only (another user's is a 404, as if it did not exist); an admin on every job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import FileResponse, Response, StreamingResponse

from api.deps import (
    ArtifactsDep,
    CallerDep,
    CurrentUserDep,
    RayJobsDep,
    SessionDep,
    SettingsDep,
    VisibleJobDep,
    current_token,
)
from api.errors import error_responses
from api.response_cache import read_job_list_page, read_job_page
from api.schemas import (
    MAX_OFFSET,
    CurvePointPublic,
    CurvePublic,
    EpochMetricsPublic,
    JobEventPublic,
    JobLogs,
    JobPage,
    JobPublic,
    TradeoffPublic,
    TrialKey,
    TrialPublic,
)
from service import jobs, uploads
from service.artifacts import ArtifactStore
from service.models import JobStatus
from workers.spec import JobSpec

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(current_token)],
    responses=error_responses(401, 403, 404, 409, 413, 422, 429),
)


@router.post("", status_code=status.HTTP_201_CREATED)
def submit_job(
    spec: JobSpec, session: SessionDep, settings: SettingsDep, user: CurrentUserDep
) -> JobPublic:
    """Queue a job of the caller's; the response holds the spec as resolved (defaults filled).
    Over one of the caller's limits it is 429, naming the limit; priority high is for admins.
    An evaluate job's source must be a model or trial checkpoint the caller may use (422)."""
    uploads.check_source(session, spec, user)
    return JobPublic.from_job(jobs.create_job(session, spec, settings, owner=user))


@router.get("", response_model=JobPage)
async def list_jobs(
    session: SessionDep,
    user: CallerDep,
    request: Request,
    status: JobStatus | None = None,
    owner: Annotated[str | None, Query(description="Admins: only this user's jobs.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    """Jobs, newest first, optionally of one status: the caller's own, or an admin's pick."""
    page = await read_job_list_page(
        session,
        user,
        owner=owner,
        status=status,
        limit=limit,
        offset=offset,
        pages=request.app.state.job_pages,
    )
    return Response(page, media_type="application/json")


@router.get("/{job_id}", response_model=JobPublic)
async def read_job(job_id: str, session: SessionDep, user: CallerDep, request: Request) -> Response:
    """The job, as clients poll it: served from this process's cache of serialised pages
    while the job and its trials are unchanged (api.response_cache)."""
    page = await read_job_page(session, job_id, user, request.app.state.job_pages)
    return Response(page, media_type="application/json")


@router.post("/{job_id}/cancel")
def cancel_job(job: VisibleJobDep, session: SessionDep, user: CurrentUserDep) -> JobPublic:
    """Cancel a job that has not finished; it is stopped on Ray in the background."""
    return JobPublic.from_job(jobs.cancel_job(session, job, by=user))


@router.get("/{job_id}/events")
def list_job_events(job: VisibleJobDep) -> list[JobEventPublic]:
    """Every status change of the job, with its time and reason, oldest first."""
    return [JobEventPublic.model_validate(event) for event in job.events]


@router.get("/{job_id}/trials")
def list_trials(job: VisibleJobDep) -> list[TrialPublic]:
    return [TrialPublic.from_trial(trial) for trial in job.trials]


@router.get("/{job_id}/trials/{trial_key}/metrics")
def list_trial_metrics(
    job: VisibleJobDep, trial_key: TrialKey, session: SessionDep
) -> list[EpochMetricsPublic]:
    """The trial's metrics, one entry per epoch, in order."""
    trial = jobs.get_trial(session, job, trial_key)
    return [EpochMetricsPublic.model_validate(row) for row in trial.metrics]


@router.get(
    "/{job_id}/trials/{trial_key}/checkpoint",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_checkpoint(
    job: VisibleJobDep, trial_key: TrialKey, session: SessionDep, store: ArtifactsDep
) -> Response:
    """The trial's best model so far (of its best epoch by validation), loadable by
    ``workers.models.load_checkpoint``, whatever the trial's status; its SHA-256 is in the
    ``X-Content-SHA256`` header."""
    trial = jobs.get_trial(session, job, trial_key)
    return artifact_response(
        store,
        jobs.checkpoint_key(trial),
        filename=f"{job.id}-{trial_key}.pt",
        sha256=trial.checkpoint_sha256,
    )


def artifact_response(
    store: ArtifactStore, key: str, *, filename: str, sha256: str | None
) -> Response:
    """A file of the artifact store as a download: sent from disk when the store is a folder,
    streamed from it otherwise."""
    headers = {"X-Content-SHA256": sha256} if sha256 else {}
    local = store.local_path(key)
    if local is not None:
        if not local.is_file():
            raise jobs.CheckpointUnavailable(f"{key} is missing from the artifact store")
        return FileResponse(
            local, media_type="application/octet-stream", filename=filename, headers=headers
        )
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(
        store.chunks(key), media_type="application/octet-stream", headers=headers
    )


@router.get("/{job_id}/logs")
def read_job_logs(job: VisibleJobDep, ray_jobs: RayJobsDep) -> JobLogs:
    """The job's Ray Job log: its driver's output, the Tune progress and any error."""
    return JobLogs(logs=jobs.ray_logs(job, ray_jobs.logs))


@router.get("/{job_id}/tradeoff")
def read_tradeoff(job: VisibleJobDep) -> TradeoffPublic:
    """Clean against robust accuracy of every configuration with final results, with the
    Pareto front; the robust axis is AutoAttack's where the job ran it, and says which."""
    return TradeoffPublic.from_job(job)


@router.get("/{job_id}/curve")
def read_curve(job: VisibleJobDep) -> list[CurvePublic]:
    """The robustness curve (accuracy against epsilon) of an evaluate job's model; points
    appear as their attacks finish. A training job has none (an empty list)."""
    return [
        CurvePublic(
            trial=trial.key,
            status=trial.status,
            points=[CurvePointPublic.model_validate(point) for point in trial.curve],
        )
        for trial in job.trials
        if trial.curve
    ]
