"""The routes a job's workers use, with that job's worker token, while the job has not ended
(afterwards the token opens nothing: 403). Every write is idempotent: a worker may retry any
post, and posts may arrive in any order."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.deps import ArtifactsDep, OpenJobDep, SessionDep, SettingsDep, require_worker
from api.errors import error_responses
from api.routes.jobs import artifact_response
from api.schemas import (
    CurvePointPublic,
    CurvePointReport,
    EpochMetricsPublic,
    EpochMetricsReport,
    JobEventReport,
    JobPublic,
    TrialKey,
    TrialPublic,
    TrialReport,
)
from service import jobs, uploads
from service.artifacts import receive, temporary_upload

router = APIRouter(
    prefix="/v1/internal/jobs/{job_id}",
    tags=["internal (workers)"],
    dependencies=[Depends(require_worker)],
    responses=error_responses(401, 403, 404, 409, 413, 422),
)


@router.post("/events")
def post_job_event(report: JobEventReport, job: OpenJobDep, session: SessionDep) -> JobPublic:
    """A change of the job's status; the status it already has is a no-op."""
    job = jobs.record_job_event(
        session, job, report.status, reason=report.reason, error=report.error
    )
    return JobPublic.from_job(job)


@router.put("/trials/{trial_key}")
def put_trial(
    trial_key: TrialKey, report: TrialReport, job: OpenJobDep, session: SessionDep
) -> TrialPublic:
    """Create or update a trial: its status never moves back, and nulls never erase values."""
    trial = jobs.upsert_trial(session, job, trial_key, **report.model_dump())
    return TrialPublic.from_trial(trial)


@router.post("/trials/{trial_key}/metrics")
async def post_epoch_metrics(
    job_id: str, trial_key: TrialKey, report: EpochMetricsReport, session: SessionDep
) -> EpochMetricsPublic:
    """One epoch's metrics of a trial, stored once per (trial, epoch)."""

    # The job is read here, not by OpenJobDep: the hottest write of the service then takes
    # its connection and gives it back (the commit) in one thread hop; the rest is in the
    # event loop (an async route's response is not validated in yet another thread).
    def record() -> EpochMetricsPublic:
        job = jobs.get_open_job(session, job_id)
        row = jobs.record_epoch_metrics(session, job, trial_key, **report.model_dump())
        return EpochMetricsPublic.model_validate(row)

    return await run_in_threadpool(record)


@router.post("/trials/{trial_key}/curve")
def post_curve_point(
    trial_key: TrialKey, report: CurvePointReport, job: OpenJobDep, session: SessionDep
) -> CurvePointPublic:
    """A point of an evaluate job's robustness curve, stored once per (trial, epsilon)."""
    point = jobs.record_curve_point(session, job, trial_key, **report.model_dump())
    return CurvePointPublic.model_validate(point)


@router.put(
    "/trials/{trial_key}/checkpoint",
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {}}}},
)
async def put_checkpoint(
    request: Request,
    trial_key: TrialKey,
    epoch: Annotated[int, Query(ge=1)],
    x_content_sha256: Annotated[str, Header(pattern=r"^[0-9a-fA-F]{64}$")],
    job: OpenJobDep,
    session: SessionDep,
    settings: SettingsDep,
    store: ArtifactsDep,
) -> TrialPublic:
    """The trial's best model so far (of best epoch ``epoch``), streamed as the body and
    checked against its SHA-256. The same upload twice, or an older epoch's after a newer one,
    changes nothing."""
    with temporary_upload(settings.home / "uploads") as path:
        received = await receive(
            request.stream(),
            path,
            max_bytes=settings.max_upload_bytes,
            expected_sha256=x_content_sha256,
        )

        def store_and_record() -> TrialPublic:
            key = jobs.checkpoint_store_key(job.id, trial_key, received.sha256)
            store.put(key, path)
            trial, unused = jobs.record_checkpoint(
                session, job, trial_key, epoch=epoch, sha256=received.sha256, size=received.size
            )
            if unused is not None:
                store.delete(unused)
            return TrialPublic.from_trial(trial)

        return await run_in_threadpool(store_and_record)


@router.get(
    "/source",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_source(job: OpenJobDep, session: SessionDep, store: ArtifactsDep) -> Response:
    """The model file an evaluate job attacks (its ``source``), as the artifact store has it."""
    return artifact_response(
        store, uploads.job_source_key(session, job), filename="source", sha256=None
    )
