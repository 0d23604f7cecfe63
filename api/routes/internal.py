"""The routes a job's workers post to, with that job's worker token. Every write is
idempotent: a worker may retry any post, and posts may arrive in any order."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.deps import JobDep, SessionDep, require_worker
from api.errors import error_responses
from api.schemas import (
    EpochMetricsPublic,
    EpochMetricsReport,
    JobEventReport,
    JobPublic,
    TrialKey,
    TrialPublic,
    TrialReport,
)
from service import jobs

router = APIRouter(
    prefix="/v1/internal/jobs/{job_id}",
    tags=["internal (workers)"],
    dependencies=[Depends(require_worker)],
    responses=error_responses(401, 403, 404, 409, 413, 422),
)


@router.post("/events")
def post_job_event(report: JobEventReport, job: JobDep, session: SessionDep) -> JobPublic:
    """A change of the job's status; the status it already has is a no-op."""
    job = jobs.record_job_event(
        session, job, report.status, reason=report.reason, error=report.error
    )
    return JobPublic.from_job(job)


@router.put("/trials/{trial_key}")
def put_trial(
    trial_key: TrialKey, report: TrialReport, job: JobDep, session: SessionDep
) -> TrialPublic:
    """Create or update a trial: its status never moves back, and nulls never erase values."""
    trial = jobs.upsert_trial(session, job, trial_key, **report.model_dump())
    return TrialPublic.model_validate(trial)


@router.post("/trials/{trial_key}/metrics")
def post_epoch_metrics(
    trial_key: TrialKey, report: EpochMetricsReport, job: JobDep, session: SessionDep
) -> EpochMetricsPublic:
    """One epoch's metrics of a trial, stored once per (trial, epoch)."""
    row = jobs.record_epoch_metrics(session, job, trial_key, **report.model_dump())
    return EpochMetricsPublic.model_validate(row)
