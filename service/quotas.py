"""What one user may submit: their limits (the server's settings, or an admin's overrides for
that user) and who may ask for priority ``high``.

A submission over a limit is refused with :class:`QuotaExceeded` (a 429) naming the limit; it
is checked apart from the spec limits that protect the cluster (``ADVORCH_MAX_TRIALS`` and the
like, a 422 for everyone).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.models import Job, JobStatus, User
from service.settings import Settings
from service.users import Forbidden
from workers.spec import JobSpec

# The jobs that count against a user's max_active_jobs: waiting for Ray, or on it.
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.SUBMITTED, JobStatus.RUNNING})


class QuotaExceeded(Exception):
    """A user's submission over one of their limits; the message names the limit."""


@dataclass(frozen=True)
class UserLimits:
    max_active_jobs: int  # queued, submitted and running jobs at once
    max_trials_per_job: int


def user_limits(user: User, settings: Settings) -> UserLimits:
    """The limits that apply to ``user``: an admin's override where there is one."""
    return UserLimits(
        max_active_jobs=_override_or(user.max_active_jobs, settings.user_max_active_jobs),
        max_trials_per_job=_override_or(user.max_trials_per_job, settings.user_max_trials_per_job),
    )


def _override_or(override: int | None, default: int) -> int:
    return default if override is None else override


def check_submission(session: Session, user: User, spec: JobSpec, settings: Settings) -> None:
    """Raise Forbidden for a priority the user may not ask for, and QuotaExceeded for a job over
    their limits. Call it in the transaction that adds the job: it locks the user's row, so two
    submissions of one user at once cannot both take the last place."""
    if spec.priority == "high" and not user.is_admin:
        raise Forbidden("priority: only admins may submit jobs of priority 'high'")
    limits = user_limits(user, settings)
    trials = spec.num_trials()
    if trials > limits.max_trials_per_job:
        raise QuotaExceeded(
            f"over your limit max_trials_per_job: this spec expands to {trials} trials, at most "
            f"{limits.max_trials_per_job} per job allowed"
            + _source(user.max_trials_per_job, "ADVORCH_USER_MAX_TRIALS_PER_JOB")
        )
    _lock(session, user)
    active = session.scalar(
        select(func.count()).where(Job.owner_id == user.id, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= limits.max_active_jobs:
        raise QuotaExceeded(
            f"over your limit max_active_jobs: you have {active} queued or running jobs, at "
            f"most {limits.max_active_jobs} allowed"
            + _source(user.max_active_jobs, "ADVORCH_USER_MAX_ACTIVE_JOBS")
            + "; wait for some to finish, or cancel some"
        )


def _source(override: int | None, setting: str) -> str:
    """Where a limit comes from, for the message."""
    return f" ({setting})" if override is None else " (an admin's override for you)"


def _lock(session: Session, user: User) -> None:
    """Hold the user's row until the transaction ends. An UPDATE (that changes nothing) and not
    SELECT ... FOR UPDATE, because SQLite has no row locks: the write takes its database lock,
    and PostgreSQL the row's."""
    session.execute(update(User).where(User.id == user.id).values(is_admin=User.is_admin))
