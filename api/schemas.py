"""What the API reads and writes: response models for users, the reports workers post, and
the accounts admins manage.

The job spec itself (the body of ``POST /v1/jobs``) is ``workers.spec.JobSpec``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from service.jobs import Progress, job_progress
from service.models import (
    ActorKind,
    AuditAction,
    Job,
    JobStatus,
    Trial,
    TrialStatus,
    User,
)
from service.quotas import user_limits
from service.results import (
    RobustAxis,
    TradeoffPoint,
    best_trial,
    robust_axis,
    selection_metric,
    tradeoff,
)
from service.settings import Settings

# --- users read ---


def _a_json_number(cls: type, value: Any) -> Any:
    """A JSON integer as JSON Schema has it: 3 and 3.0 are the same number, "3" and true are
    not numbers at all (lax pydantic would take them)."""
    if isinstance(value, str | bool):
        raise ValueError("Input should be a valid integer")
    return value


# The furthest a page may start: beyond what a 64-bit database integer holds, no row is.
MAX_OFFSET = 2**31 - 1

# An accuracy as a fraction in [0, 1].
Accuracy = Annotated[float, Field(ge=0, le=1)]
# Which weights a trial's numbers are of (workers.training.TRAINED_WEIGHTS, EMA_WEIGHTS).
Weights = Literal["trained", "ema"]


class BestTrialPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    key: str
    config: dict[str, Any]
    chosen_by: str = Field(description="The validation score it was chosen by.")
    val_clean_acc: float | None
    val_robust_acc: float | None
    clean_acc: float | None
    robust_acc: float | None
    autoattack_acc: float | None

    @classmethod
    def of(cls, job: Job) -> BestTrialPublic | None:
        best = best_trial(job)
        if best is None:
            return None
        chosen_by = "evaluate job" if job.spec.get("kind") == "evaluate" else selection_metric(job)
        return cls.model_validate({**_columns(best), "chosen_by": chosen_by})


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
    best_trial: BestTrialPublic | None = Field(
        description="The trial of the best validation score (never chosen by a test number)."
    )
    robust_axis: RobustAxis = Field(
        description="Which robust accuracy to show for the job (the trade-off's axis): the "
        "trial column (autoattack_acc where the job runs AutoAttack, else robust_acc), the "
        "attack, epsilon."
    )

    @classmethod
    def from_job(cls, job: Job) -> JobPublic:
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
            best_trial=BestTrialPublic.of(job),
            robust_axis=robust_axis(job),
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


class CheckpointPublic(BaseModel):
    epoch: int = Field(description="The best epoch so far, whose model this is.")
    sha256: str
    bytes: int
    url: str = Field(description="Where to download it (with the user's token).")


class TrialPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    key: str
    config: dict[str, Any]
    status: TrialStatus
    clean_acc: float | None = Field(description="Test split, best epoch's model.")
    robust_acc: float | None = Field(description="PGD on the test split, best epoch's model.")
    autoattack_acc: float | None = Field(description="AutoAttack (standard), when the job ran it.")
    autoattack: dict[str, Any] | None = Field(
        description="AutoAttack's details: accuracy after each attack, seconds, its warnings "
        "and RobustBench's 'unreliable' flag; while it runs, the attacks done so far."
    )
    best_epoch: int | None
    val_clean_acc: float | None = Field(description="Validation split, at the best epoch.")
    val_robust_acc: float | None
    weights: Weights | None = Field(
        description="Which weights every number of the trial is of (its validation, best epoch, "
        "checkpoint and test accuracies): 'trained', or 'ema', the exponential moving average "
        "of the weights (training.ema)."
    )
    checkpoint: CheckpointPublic | None
    error: str | None
    reason: str | None = Field(description="Why it ended, when not succeeded.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_trial(cls, trial: Trial) -> TrialPublic:
        checkpoint = None
        if trial.checkpoint_sha256 is not None:
            checkpoint = CheckpointPublic(
                epoch=trial.checkpoint_epoch or 0,
                sha256=trial.checkpoint_sha256,
                bytes=trial.checkpoint_bytes or 0,
                url=f"/v1/jobs/{trial.job_id}/trials/{trial.key}/checkpoint",
            )
        return cls.model_validate({**_columns(trial), "checkpoint": checkpoint})


def _columns(row: Trial) -> dict[str, Any]:
    return {column: getattr(row, column) for column in row.__table__.columns.keys()}  # noqa: SIM118


class CurvePointPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epsilon: float
    clean_acc: float | None
    robust_acc: float | None
    autoattack_acc: float | None
    autoattack: dict[str, Any] | None


class CurvePublic(BaseModel):
    """An evaluate job's robustness curve: accuracy against epsilon."""

    trial: str
    status: TrialStatus
    points: list[CurvePointPublic]


class EpochMetricsPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int
    train_loss: float | None
    train_acc: float | None
    val_clean_acc: float | None
    val_robust_acc: float | None
    lr: float | None
    train_epsilon: float | None = Field(
        description="The training epsilon at the epoch's last step: below training.epsilon "
        "during its warm-up (training.epsilon_warmup_epochs); evaluation is always at the full "
        "evaluation epsilon."
    )
    epoch_seconds: float | None
    images_per_second: float | None
    created_at: datetime = Field(description="When the epoch was first posted (UTC).")


class TradeoffPublic(BaseModel):
    robust_axis: RobustAxis = Field(description="Which robust accuracy: the attack, epsilon.")
    points: list[TradeoffPoint] = Field(
        description="Every configuration with final results; repeats as mean and std."
    )
    front: list[TradeoffPoint] = Field(description="The Pareto front, by clean accuracy.")

    @classmethod
    def from_job(cls, job: Job) -> TradeoffPublic:
        axis, points = tradeoff(job)
        return cls(robust_axis=axis, points=points, front=[p for p in points if p.on_front])


class ModelPublic(BaseModel):
    """A model file uploaded for evaluate jobs (``source: {model: ID}``)."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    format: str = Field(description="advorch (a checkpoint) or torch_export (a .pt2 program).")
    sha256: str
    bytes: int
    created_at: datetime


# --- workers report ---

# The worker's own stable name of a trial; users address trials by it too.
TrialKey = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]


# The most a worker's report may say in one string, or in one JSON field (a config, AutoAttack's
# details): enough for any real error or config, not for filling the database.
MAX_REPORT_TEXT = 10_000


def _small_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value)) > MAX_REPORT_TEXT:
        raise ValueError(f"at most {MAX_REPORT_TEXT} characters as JSON")
    return value


ReportText = Annotated[str, Field(max_length=MAX_REPORT_TEXT)]
SmallJson = Annotated[dict[str, Any], AfterValidator(_small_json)]


class JobEventReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal[JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED]
    reason: Annotated[str, Field(min_length=1, max_length=MAX_REPORT_TEXT)]
    error: ReportText | None = None


class TrialReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: SmallJson = Field(description='The fields it overrides: {"training.beta": 6.0}')
    status: TrialStatus | None = None
    clean_acc: Accuracy | None = None
    robust_acc: Accuracy | None = None
    autoattack_acc: Accuracy | None = None
    autoattack: SmallJson | None = None
    best_epoch: Annotated[int, Field(ge=1)] | None = None
    val_clean_acc: Accuracy | None = None
    val_robust_acc: Accuracy | None = None
    weights: Weights | None = None
    error: ReportText | None = None
    reason: ReportText | None = None


class CurvePointReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epsilon: Annotated[float, Field(gt=0, le=1)]
    clean_acc: Accuracy | None = None
    robust_acc: Accuracy | None = None
    autoattack_acc: Accuracy | None = None
    autoattack: SmallJson | None = None


class EpochMetricsReport(BaseModel):
    # Workers may report more than the service keeps; the named metrics are stored.
    model_config = ConfigDict(extra="ignore")

    epoch: Annotated[int, Field(ge=1)]
    train_loss: float | None = None
    train_acc: float | None = None
    val_clean_acc: float | None = None
    val_robust_acc: float | None = None
    lr: float | None = None
    train_epsilon: Annotated[float, Field(ge=0, le=1)] | None = None
    epoch_seconds: float | None = None
    images_per_second: float | None = None


# --- accounts: admins manage them, anyone reads their own ---

UserName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

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

    _whole_numbers = field_validator("*", mode="before")(_a_json_number)


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
