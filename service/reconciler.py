"""The reconciler: brings the database in line with Ray, when ``advorch serve`` starts and
every ``reconcile_interval_s`` after.

The database is the truth for users, Ray the truth for what runs. Workers tell the service how
a job ends; when their last word never arrives (the entrypoint crashed, the spec could not run,
the service was away too long, the cluster was replaced), the reconciler closes the gap, so no
job stays ``submitted`` or ``running`` forever. Each such job is looked up on Ray:

    Ray Job still PENDING or RUNNING   left alone
    Ray Job FAILED                     failed, with Ray's message (the entrypoint's last logs)
    Ray Job STOPPED                    cancelled (someone stopped it on Ray)
    Ray Job SUCCEEDED                  succeeded
    no such Ray Job                    failed: the cluster does not know it
"""

from __future__ import annotations

import logging

from ray.job_submission import JobStatus as RayJobStatus
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.models import Job, JobStatus
from service.ray_cluster import RayJobs

log = logging.getLogger(__name__)


def reconcile(session_factory: sessionmaker[Session], ray_jobs: RayJobs) -> None:
    """One round over every job the database has on Ray."""
    with session_factory() as session:
        for job in jobs.jobs_in_status(session, JobStatus.SUBMITTED, JobStatus.RUNNING):
            reconcile_job(session, ray_jobs, job)


def reconcile_job(session: Session, ray_jobs: RayJobs, job: Job) -> None:
    assert job.ray_submission_id is not None, "a submitted job has a Ray submission id"
    info = ray_jobs.info(job.ray_submission_id)
    if info is None:
        to, reason = JobStatus.FAILED, "its Ray Job is unknown to the cluster"
        error = (
            f"the Ray cluster at {ray_jobs.address} has no job {job.ray_submission_id}: "
            "it was restarted or replaced while the job ran"
        )
    elif not info.status.is_terminal():
        return
    elif info.status == RayJobStatus.SUCCEEDED:
        to, reason, error = JobStatus.SUCCEEDED, "its Ray Job succeeded", None
    elif info.status == RayJobStatus.STOPPED:
        to, reason, error = JobStatus.CANCELLED, "its Ray Job was stopped on Ray", None
    else:
        to, reason = JobStatus.FAILED, "its Ray Job failed"
        error = info.message or f"Ray Job {job.ray_submission_id} failed"
    try:
        jobs.transition(session, job, to, reason=f"reconciler: {reason}", error=error)
    except jobs.IllegalTransition:
        return  # its workers (or a user) changed it meanwhile; their word stands
    log.info("job %s: %s; now %s", job.id, reason, to)
