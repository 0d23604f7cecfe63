"""What the API reads and writes: response models for users, the reports workers post, and
the accounts admins manage.

The job spec itself (the body of ``POST /v1/jobs``) is ``workers.spec.JobSpec``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from service.jobs import Progress, TradeoffPoint, best_trial, job_progress, tradeoff
from service.models import ActorKind, AuditAction, Job, JobStatus, TrialStatus, User
from service.quotas import user_limits
from service.settings import Settings

# --- users read ---


class BestTrialPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    key: str
    config: dict[str, Any]
    clean_acc: float | None
    robust_acc: float | None


class JobPublic(BaseModel):
    id: str
    name: str
    owner: str = Field(description="The name of the user who submitted it.")
    status: JobStatus
    spec: dict[str, Any] = Field(description="The spec as resolved: defaults filled, as it runs.")
    num_trials: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    ray_submission_id: str | None
    dashboard_url: str | None
    progress: Progress
    best_trial: BestTrialPublic | None = Field(description="The trial of highest robust_acc.")

    @classmethod
    def from_job(cls, job: Job) -> JobPublic:
        best = best_trial(job)
        return cls(
            id=job.id,
            name=job.name,
            owner=job.owner.name,
            status=job.status,
            spec=job.spec,
            num_trials=job.num_trials,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=job.error,
            ray_submission_id=job.ray_submission_id,
            dashboard_url=job.dashboard_url,
            progress=job_progress(job),
            best_trial=BestTrialPublic.model_validate(best) if best else None,
        )


class JobPage(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class JobLogs(BaseModel):
    logs: str = Field(description="The Ray Job's log, as Ray keeps it.")


class JobEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_status: JobStatus | None
    to_status: JobStatus
    reason: str
    created_at: datetime


class TrialPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    key: str
    config: dict[str, Any]
    status: TrialStatus
    clean_acc: float | None
    robust_acc: float | None
    best_epoch: int | None
    checkpoint_uri: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime


class EpochMetricsPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float | None
    train_acc: float | None
    val_clean_acc: float | None
    val_robust_acc: float | None
    lr: float | None
    epoch_seconds: float | None
    images_per_second: float | None


class TradeoffPublic(BaseModel):
    points: list[TradeoffPoint] = Field(description="Every trial with final metrics.")
    front: list[TradeoffPoint] = Field(description="The Pareto front, by clean accuracy.")

    @classmethod
    def from_job(cls, job: Job) -> TradeoffPublic:
        points = tradeoff(job)
        return cls(points=points, front=[p for p in points if p.on_front])


# --- workers report ---

# The worker's own stable name of a trial; users address trials by it too.
TrialKey = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]


class JobEventReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal[JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED]
    reason: Annotated[str, Field(min_length=1)]
    error: str | None = None


class TrialReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(description='The fields it overrides: {"training.beta": 6.0}')
    status: TrialStatus | None = None
    clean_acc: float | None = None
    robust_acc: float | None = None
    best_epoch: Annotated[int, Field(ge=1)] | None = None
    checkpoint_uri: str | None = None
    error: str | None = None


class EpochMetricsReport(BaseModel):
    # Workers may report more than the service keeps; the named metrics are stored.
    model_config = ConfigDict(extra="ignore")

    epoch: Annotated[int, Field(ge=1)]
    train_loss: float | None = None
    train_acc: float | None = None
    val_clean_acc: float | None = None
    val_robust_acc: float | None = None
    lr: float | None = None
    epoch_seconds: float | None = None
    images_per_second: float | None = None


# --- accounts: admins manage them, anyone reads their own ---

UserName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: UserName
    admin: bool = False


class Limits(BaseModel):
    """The limits that apply to a user, an admin's override or the server's setting."""

    max_active_jobs: int = Field(description="Queued, submitted and running jobs at once.")
    max_trials_per_job: int


class LimitOverrides(BaseModel):
    """A user's own limits, set by an admin; null: the server's setting applies. In a PATCH,
    only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    max_active_jobs: Annotated[int, Field(ge=0)] | None = None
    max_trials_per_job: Annotated[int, Field(ge=1)] | None = None


class TokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="The token's name (it is in the token: adv_<id>_<secret>).")
    created_at: datetime
    revoked_at: datetime | None


class NewToken(BaseModel):
    id: str
    token: str = Field(description="The token itself: shown this once, stored only hashed.")
    created_at: datetime


class UserPublic(BaseModel):
    name: str
    admin: bool
    created_at: datetime
    disabled_at: datetime | None
    limits: Limits
    limit_overrides: LimitOverrides
    tokens: list[TokenPublic]

    @classmethod
    def from_user(cls, user: User, settings: Settings) -> UserPublic:
        limits = user_limits(user, settings)
        return cls(
            name=user.name,
            admin=user.is_admin,
            created_at=user.created_at,
            disabled_at=user.disabled_at,
            limits=Limits(
                max_active_jobs=limits.max_active_jobs,
                max_trials_per_job=limits.max_trials_per_job,
            ),
            limit_overrides=LimitOverrides(
                max_active_jobs=user.max_active_jobs,
                max_trials_per_job=user.max_trials_per_job,
            ),
            tokens=[TokenPublic.model_validate(token) for token in user.tokens],
        )


class UserCreated(BaseModel):
    user: UserPublic
    token: NewToken


class Me(UserPublic):
    token_id: str = Field(description="The id of the token this request was made with.")


class AuditEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    actor_kind: ActorKind = Field(description="user, or worker (the workers of one job)")
    actor: str = Field(description="The user's name, or the worker's job id.")
    action: AuditAction
    target: str = Field(description="What it was done to: a job id, a user's name, a token id.")
    detail: str


class AuditPage(BaseModel):
    items: list[AuditEventPublic]
    total: int
    limit: int
    offset: int
