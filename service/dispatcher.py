"""The dispatcher: submits queued jobs to Ray, and stops cancelled ones there.

Each round (every ``dispatch_interval_s``, from ``advorch serve``):

- each job a user cancelled after it was submitted is stopped on Ray;
- while fewer than ``max_running_jobs`` jobs are on Ray (submitted or running), the next queued
  job (:func:`next_job`: by priority, then fairly between users, then oldest first) is submitted
  as the Ray Job ``advorch-<job id>`` running ``python -m workers.entrypoint`` with the job's
  ``JobEnv`` (its id, the service's URL, its worker token, its spec, where checkpoints and data
  are) and the variables ``ADVORCH_PASS_ENV`` names (S3 credentials), then marked
  ``submitted``. The others wait, queued, for a later round.

The Ray submission id is the job's, so a dispatcher that dies between submitting and marking
starts nothing twice: the next round finds the Ray Job there and only marks the job.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence

from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.auth import worker_token
from service.models import Job, JobPriority, JobStatus
from service.ray_cluster import RayJobs
from service.settings import Settings
from workers.job_env import JobEnv

log = logging.getLogger(__name__)

ENTRYPOINT = "python -m workers.entrypoint"
# Ray's own settings for a job's processes: no preemption watcher actor beside each Train run
# (advorch does not run on preemptible nodes that announce it), one process less to start.
RAY_JOB_SETTINGS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
PRIORITY_RANK: dict[JobPriority, int] = {
    JobPriority.HIGH: 0,
    JobPriority.NORMAL: 1,
    JobPriority.LOW: 2,
}


def ray_submission_id(job_id: str) -> str:
    return f"advorch-{job_id}"


def dispatch(session_factory: sessionmaker[Session], ray_jobs: RayJobs, settings: Settings) -> None:
    """One round: stop what was cancelled, then submit queued jobs while there is room."""
    with session_factory() as session:
        for job in jobs.jobs_pending_ray_cleanup(session):
            stop_on_ray(session, ray_jobs, job)
        on_ray = jobs.jobs_in_status(session, JobStatus.SUBMITTED, JobStatus.RUNNING)
        on_ray_per_owner = Counter(job.owner_id for job in on_ray)
        room = settings.max_running_jobs - len(on_ray)
        queued = jobs.jobs_in_status(session, JobStatus.QUEUED)
        while room > 0 and queued:
            job = next_job(queued, on_ray_per_owner)
            queued.remove(job)
            submit(session, ray_jobs, settings, job)
            if job.status == JobStatus.SUBMITTED:  # not refused by Ray, nor cancelled meanwhile
                on_ray_per_owner[job.owner_id] += 1
                room -= 1


def next_job(queued: Sequence[Job], on_ray_per_owner: Mapping[int, int]) -> Job:
    """The queued job to submit next: the highest priority first; among jobs of one priority,
    the oldest job of the user with the fewest jobs on Ray (whatever their priorities), so one
    user's burst never starves another user's single job; then the oldest. Priority comes
    before fairness because only admins may ask for high, and low is a user's own choice."""
    return min(
        queued,
        key=lambda job: (
            PRIORITY_RANK[job.priority],
            on_ray_per_owner.get(job.owner_id, 0),
            job.created_at,
            job.id,
        ),
    )


def submit(session: Session, ray_jobs: RayJobs, settings: Settings, job: Job) -> None:
    """Submit a queued job to Ray and mark it submitted. A job Ray refuses (4xx) fails with
    Ray's answer; one Ray cannot be reached for stays queued for the next round."""
    submission_id = ray_submission_id(job.id)
    job_env = JobEnv(
        job_id=job.id,
        service_url=settings.resolved_public_url,
        worker_token=worker_token(settings, job.id),
        # As submitted: each trial resolves its own defaults (jobs older than that column
        # have only the resolved spec).
        spec_json=json.dumps(job.submitted_spec or job.spec),
        storage_uri=settings.resolved_storage_uri,  # checked at start (service.storage)
        data_dir=str(settings.resolved_data_dir.resolve()),
        node_wait_s=settings.node_wait_s,
    )
    try:
        env_vars = settings.passed_env | job_env.as_env_vars() | RAY_JOB_SETTINGS
        ray_jobs.submit(submission_id, ENTRYPOINT, env_vars)
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
