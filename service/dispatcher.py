"""The dispatcher: submits queued jobs to Ray, and stops cancelled ones there.

Each round (every ``dispatch_interval_s``, from ``advorch serve``):

- each job a user cancelled after it was submitted is stopped on Ray;
- each queued job, oldest first, is submitted as the Ray Job ``advorch-<job id>`` running
  ``python -m workers.entrypoint`` with the job's ``JobEnv`` (its id, the service's URL, its
  worker token, its spec, where checkpoints and data are), then marked ``submitted``.

The Ray submission id is the job's, so a dispatcher that dies between submitting and marking
starts nothing twice: the next round finds the Ray Job there and only marks the job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.auth import worker_token
from service.models import Job, JobStatus
from service.ray_cluster import RayJobs
from service.settings import Settings
from workers.job_env import JobEnv

log = logging.getLogger(__name__)

ENTRYPOINT = "python -m workers.entrypoint"


def ray_submission_id(job_id: str) -> str:
    return f"advorch-{job_id}"


def dispatch(session_factory: sessionmaker[Session], ray_jobs: RayJobs, settings: Settings) -> None:
    """One round: stop what was cancelled, submit what is queued."""
    with session_factory() as session:
        for job in jobs.jobs_pending_ray_cleanup(session):
            stop_on_ray(session, ray_jobs, job)
        for job in jobs.jobs_in_status(session, JobStatus.QUEUED):
            submit(session, ray_jobs, settings, job)


def submit(session: Session, ray_jobs: RayJobs, settings: Settings, job: Job) -> None:
    """Submit a queued job to Ray and mark it submitted. A job Ray refuses (4xx) fails with
    Ray's answer; one Ray cannot be reached for stays queued for the next round."""
    submission_id = ray_submission_id(job.id)
    job_env = JobEnv(
        job_id=job.id,
        service_url=settings.resolved_public_url,
        worker_token=worker_token(settings, job.id),
        spec_json=json.dumps(job.spec),
        storage_uri=_absolute(settings.resolved_storage_uri),
        data_dir=str(settings.resolved_data_dir.resolve()),
    )
    try:
        ray_jobs.submit(submission_id, ENTRYPOINT, job_env.as_env_vars())
    except RuntimeError as err:
        if "status code 4" not in str(err):
            raise
        jobs.transition(session, job, JobStatus.FAILED, reason="Ray refused it", error=str(err))
        return
    try:
        jobs.mark_submitted(
            session,
            job,
            ray_submission_id=submission_id,
            dashboard_url=ray_jobs.dashboard_url(submission_id),
        )
    except jobs.IllegalTransition:
        session.refresh(job)
        if job.status == JobStatus.CANCELLED:  # cancelled while it was being submitted
            ray_jobs.stop(submission_id)
        return
    log.info("job %s submitted to Ray as %s", job.id, submission_id)


def stop_on_ray(session: Session, ray_jobs: RayJobs, job: Job) -> None:
    """Stop a cancelled job's Ray Job, and clear the job's flag that asked for it."""
    assert job.ray_submission_id is not None, "only submitted jobs wait for a Ray cleanup"
    ray_jobs.stop(job.ray_submission_id)
    jobs.mark_ray_cleaned(session, job)
    log.info("job %s stopped on Ray (%s)", job.id, job.ray_submission_id)


def _absolute(uri: str) -> str:
    """A storage folder as an absolute path (workers run elsewhere); a URI as it is."""
    return uri if "://" in uri else str(Path(uri).resolve())
