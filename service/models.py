"""The database tables, as typed SQLAlchemy 2 models: jobs, their trials, each trial's
per-epoch metrics, and the audit trail of every job status change; the users jobs belong to,
their API tokens (hashed), and the audit trail of who did what.

The migrations in ``migrations/versions`` create exactly these tables; a test compares them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class JobStatus(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TrialStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"  # ended early by the scheduler (ASHA, successive halving)
    CANCELLED = "cancelled"  # cut short when its job was cancelled


class JobPriority(StrEnum):
    """The spec's ``priority``: the dispatcher serves every queued high job before any normal
    one, and normal before low; only admins may submit high."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


class AuditAction(StrEnum):
    JOB_SUBMIT = "job.submit"
    JOB_CANCEL = "job.cancel"
    JOB_REPORT = "job.report"  # a job's worker reported a status change
    USER_CREATE = "user.create"
    USER_DISABLE = "user.disable"
    USER_LIMITS = "user.limits"  # an admin changed a user's limit overrides
    TOKEN_ISSUE = "token.issue"
    TOKEN_REVOKE = "token.revoke"


class ActorKind(StrEnum):
    USER = "user"
    WORKER = "worker"  # the workers of one job, holding its worker token


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend: SQLite keeps no zone, so what it
    returns is read back as UTC (which is all it is ever given)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def status_column(enum: type[StrEnum]) -> Enum:
    """A status (or any other small enum) stored as its value in a VARCHAR, on every backend
    (no native ENUM type, so adding a value later is a code change, not a schema one)."""
    return Enum(
        enum,
        native_enum=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    # Named constraints, so migrations can drop and alter them on every backend.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class User(Base):
    """Someone who holds API tokens. Users are disabled, never deleted: their jobs stay."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None]
    # An admin's overrides of the server-wide limits (None: the setting applies).
    max_active_jobs: Mapped[int | None]
    max_trials_per_job: Mapped[int | None]

    tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="user", order_by="ApiToken.created_at"
    )


class ApiToken(Base):
    """One of a user's tokens, stored only as its SHA-256: the token itself is shown once."""

    __tablename__ = "api_tokens"

    # The short id the token carries in clear (adv_<id>_<secret>), to name it when revoking.
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(back_populates="tokens")


class AuditEvent(Base):
    """Who (a user, or the workers of a job) changed what, and when. Rows are only added."""

    __tablename__ = "audit_events"
    __table_args__ = (Index(None, "actor_kind", "actor"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    actor_kind: Mapped[ActorKind] = mapped_column(status_column(ActorKind))
    # A user's name, or the job id of a worker.
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[AuditAction] = mapped_column(status_column(AuditAction))
    # What it was done to: a job id, a user's name, or a token id.
    target: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")


class Job(Base):
    __tablename__ = "jobs"
    # The job list's filters with its order (newest first): a page is read in index order.
    __table_args__ = (
        Index(None, "owner_id", "created_at", "id"),
        Index(None, "status", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(status_column(JobStatus))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    # The spec's priority, kept in a column too: the dispatcher orders queued jobs by it.
    priority: Mapped[JobPriority] = mapped_column(
        status_column(JobPriority), default=JobPriority.NORMAL, server_default="normal"
    )
    # The resolved spec (JobSpec.model_dump(mode="json")): exactly what runs.
    spec: Mapped[dict[str, Any]]
    # The spec as the user wrote it (JobSpec.submitted()): what workers are given, so that each
    # trial of a sweep resolves its own defaults. None for jobs older than this column.
    submitted_spec: Mapped[dict[str, Any] | None]
    num_trials: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    ray_submission_id: Mapped[str | None] = mapped_column(String(128))
    dashboard_url: Mapped[str | None] = mapped_column(Text)
    # Set when a job that has a Ray submission is cancelled: the dispatcher stops the Ray job
    # and clears it, so a cancel never waits on Ray.
    ray_cleanup_pending: Mapped[bool] = mapped_column(default=False)
    # Optimistic locking: every UPDATE checks the version it read, so two writers (an API
    # replica cancelling, the dispatcher submitting) can never both win a status change.
    version: Mapped[int] = mapped_column(Integer)

    owner: Mapped[User] = relationship()
    trials: Mapped[list[Trial]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Trial.id"
    )
    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobEvent.id"
    )

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("job_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # The worker's own stable name for the trial; users address trials by it.
    key: Mapped[str] = mapped_column(String(128))
    # The fields this trial overrides, by dotted path: {"training.beta": 6.0}.
    config: Mapped[dict[str, Any]]
    status: Mapped[TrialStatus] = mapped_column(status_column(TrialStatus))
    # Final numbers, on the test split at the job's evaluation epsilon: clean, PGD and
    # AutoAttack accuracy of the best epoch's model.
    clean_acc: Mapped[float | None] = mapped_column(Float)
    robust_acc: Mapped[float | None] = mapped_column(Float)
    autoattack_acc: Mapped[float | None] = mapped_column(Float)
    # AutoAttack's details (workers.autoattack.AutoAttackResult.as_report()): the accuracy after
    # each attack, seconds, its checks' warnings; posted after each attack while it runs.
    autoattack: Mapped[dict[str, Any] | None]
    # The best epoch, chosen by validation robust accuracy, and its validation accuracies: what
    # the job's best trial is chosen by (never a test number).
    best_epoch: Mapped[int | None]
    val_clean_acc: Mapped[float | None] = mapped_column(Float)
    val_robust_acc: Mapped[float | None] = mapped_column(Float)
    # Which weights all of the above are of: "trained", or "ema" (the exponential moving average
    # of the weights, training.ema), which is then also what the checkpoint holds.
    weights: Mapped[str | None] = mapped_column(String(16))
    # The best model so far, as uploaded by the trial's rank 0 into the artifact store.
    checkpoint_epoch: Mapped[int | None]
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    checkpoint_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    # Why a trial that did not succeed ended as it did ("cancelled by user", "its node was
    # lost", the training's exception); every trial that ends otherwise than succeeded has one.
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    # Optimistic locking, as for jobs: a status decided on a stale read never lands.
    version: Mapped[int] = mapped_column(Integer)

    job: Mapped[Job] = relationship(back_populates="trials")
    metrics: Mapped[list[TrialMetric]] = relationship(
        back_populates="trial", cascade="all, delete-orphan", order_by="TrialMetric.epoch"
    )
    curve: Mapped[list[CurvePoint]] = relationship(
        back_populates="trial", cascade="all, delete-orphan", order_by="CurvePoint.epsilon"
    )

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class TrialMetric(Base):
    """One epoch of one trial; the metric names are design.md's."""

    __tablename__ = "trial_metrics"

    trial_id: Mapped[int] = mapped_column(
        ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(primary_key=True)
    train_loss: Mapped[float | None] = mapped_column(Float)
    train_acc: Mapped[float | None] = mapped_column(Float)
    val_clean_acc: Mapped[float | None] = mapped_column(Float)
    val_robust_acc: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    # The training epsilon at the epoch's last step (below the spec's during a warm-up).
    train_epsilon: Mapped[float | None] = mapped_column(Float)
    epoch_seconds: Mapped[float | None] = mapped_column(Float)
    images_per_second: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    trial: Mapped[Trial] = relationship(back_populates="metrics")


class CurvePoint(Base):
    """An evaluate job's model attacked at one epsilon: a point of its robustness curve."""

    __tablename__ = "curve_points"
    __table_args__ = (UniqueConstraint("trial_id", "epsilon"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), index=True)
    epsilon: Mapped[float] = mapped_column(Float)
    clean_acc: Mapped[float | None] = mapped_column(Float)
    robust_acc: Mapped[float | None] = mapped_column(Float)
    autoattack_acc: Mapped[float | None] = mapped_column(Float)
    autoattack: Mapped[dict[str, Any] | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    trial: Mapped[Trial] = relationship(back_populates="curve")


class UploadedModel(Base):
    """A model file a user uploaded (``POST /v1/models``) for evaluate jobs to attack; its bytes
    are in the artifact store, under ``models/<id>``."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    # workers.model_format: "advorch" (a checkpoint) or "torch_export" (a .pt2 program).
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    owner: Mapped[User] = relationship()


class JobEvent(Base):
    """One status change of a job: the audit trail. from_status is None for the submission."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[JobStatus | None] = mapped_column(status_column(JobStatus))
    to_status: Mapped[JobStatus] = mapped_column(status_column(JobStatus))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="events")
