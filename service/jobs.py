"""The domain: every operation on jobs and trials, and the one job state machine.

    queued -> submitted -> running -> succeeded | failed | cancelled

(plus the shortcuts a crash needs: a queued job that cannot be submitted fails, and a submitted
job whose workers never said "running" can still finish.) Routes, the dispatcher and the
reconciler all change a job's status through :func:`transition`, which records a
:class:`JobEvent` for each change, and which owns the one invariant of a job's end: when a job
ends, none of its trials is left pending or running. In the same transaction each open trial
is ended too (``cancelled`` with the job, ``failed`` otherwise: its end was lost), with the
reason, so the API never shows a running trial of an ended job.

Each function that writes is one unit of work and commits before it returns; a function that
raises has changed nothing. Writers are kept from overwriting each other by the version column
of jobs and trials: a change made on a stale copy fails (:class:`ConcurrentUpdate` for a job)
and the operations that users and workers call decide again on a fresh copy.

What workers report is idempotent: a job status it already has is a no-op, and trial and metric
writes commute, so the same post twice, or posts out of order, leave the rows that one post of
each in order would. Workers write only while their job has not ended (:func:`ensure_open`):
the entrypoint posts the job's end after every trial's last report, and a cancelled job takes
no more, so a leaked worker token cannot rewrite a finished job's results.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

from sqlalchemy import Select, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, joinedload, selectinload
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.sql.dml import ReturningInsert

from service.audit import Actor, audit_event
from service.metrics import DISPATCH_LATENCY, EPOCH_METRICS_POSTED
from service.models import (
    AuditAction,
    CurvePoint,
    Job,
    JobEvent,
    JobPriority,
    JobStatus,
    Trial,
    TrialMetric,
    TrialStatus,
    User,
    new_job_id,
    utcnow,
)
from service.quotas import check_submission
from service.settings import Settings
from workers.spec import JobSpec, field_error

FINISHED: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.SUBMITTED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUBMITTED: frozenset({JobStatus.RUNNING} | FINISHED),
    JobStatus.RUNNING: FINISHED,
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

# How often a write that lost a race is decided again. A metrics post may clash twice (on its
# trial, then on its epoch); more than that is not a race.
MAX_CONFLICT_RETRIES = 3

# A trial's status only moves forward: a late "running" never undoes "succeeded".
TRIAL_STATUS_RANK: dict[TrialStatus, int] = {
    TrialStatus.PENDING: 0,
    TrialStatus.RUNNING: 1,
    TrialStatus.SUCCEEDED: 2,
    TrialStatus.FAILED: 2,
    TrialStatus.STOPPED: 2,
    TrialStatus.CANCELLED: 2,
}
TRIAL_FINISHED: frozenset[TrialStatus] = frozenset(
    status for status, rank in TRIAL_STATUS_RANK.items() if rank == 2
)
# What a trial that ended otherwise than succeeded says when its report gave no reason.
DEFAULT_TRIAL_REASONS: dict[TrialStatus, str] = {
    TrialStatus.FAILED: "the trial failed",
    TrialStatus.STOPPED: "stopped early by the scheduler",
    TrialStatus.CANCELLED: "cancelled with its job",
}


class JobNotFound(Exception):
    pass


class TrialNotFound(Exception):
    pass


class IllegalTransition(Exception):
    """The state machine has no such change (a finished job back to running)."""


class ConcurrentUpdate(IllegalTransition):
    """Another writer changed the job after it was read; it has been reloaded."""


class CheckpointUnavailable(Exception):
    pass


class JobEnded(Exception):
    """A worker wrote to a job that has ended: its token no longer opens the job (403)."""


class InvalidReport(ValueError):
    """A worker's report that no run of its job can make (422, naming ``field``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# A trial's key as the sweep makes it: its number among the job's trials.
TRIAL_KEY = re.compile(r"^trial_(\d{4,})$")


class LogsUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Progress:
    trials_total: int
    trials_done: int
    trials_running: int


# --- submitting and reading jobs (the user routes) ---


def create_job(session: Session, spec: JobSpec, settings: Settings, *, owner: User) -> Job:
    """Queue a validated spec for ``owner``, stored resolved (defaults filled), with its trial
    count. Raises ValidationError over the server's limits, and Forbidden or QuotaExceeded
    over the owner's (service.quotas)."""
    check_limits(spec, settings)
    check_submission(session, owner, spec, settings)
    job = Job(
        id=new_job_id(),
        name=spec.name,
        status=JobStatus.QUEUED,
        spec=spec.model_dump(mode="json"),
        submitted_spec=spec.submitted(),
        num_trials=spec.num_trials(),
        owner=owner,
        priority=JobPriority(spec.priority),
    )
    session.add(job)
    session.add(JobEvent(job=job, from_status=None, to_status=JobStatus.QUEUED, reason="submitted"))
    detail = f"{spec.name}, {job.num_trials} trials, priority {spec.priority}"
    session.add(audit_event(Actor.of_user(owner), AuditAction.JOB_SUBMIT, job.id, detail))
    session.commit()
    return job


def check_limits(spec: JobSpec, settings: Settings) -> None:
    """Refuse a spec above the limits that protect the cluster, naming the field at fault.

    Raises the same ValidationError as any other spec error, so users see one kind of 422.
    """
    training_limits = {
        "epochs": (settings.max_epochs, "ADVORCH_MAX_EPOCHS"),
        "batch_size": (settings.max_batch_size, "ADVORCH_MAX_BATCH_SIZE"),
        "attack_steps": (settings.max_attack_steps, "ADVORCH_MAX_ATTACK_STEPS"),
    }
    for name, (limit, setting) in training_limits.items():
        value = getattr(spec.training, name)
        if value > limit:
            raise field_error(("training", name), _over_limit(limit, setting), value)
        space = spec.sweep.parameters.get(f"training.{name}") if spec.sweep else None
        if space is not None and max(space.candidate_values()) > limit:
            loc = ("sweep", "parameters", f"training.{name}")
            raise field_error(loc, _over_limit(limit, setting), space.candidate_values())
    other_limits: list[tuple[tuple[str, str], float, float, str]] = [
        (("evaluation", "attack_steps"), spec.evaluation.attack_steps,
         settings.max_eval_attack_steps, "ADVORCH_MAX_EVAL_ATTACK_STEPS"),
        (("evaluation", "restarts"), spec.evaluation.restarts,
         settings.max_restarts, "ADVORCH_MAX_RESTARTS"),
        (("resources", "num_workers"), spec.resources.num_workers,
         settings.max_workers, "ADVORCH_MAX_WORKERS"),
        (("resources", "cpus_per_worker"), spec.resources.cpus_per_worker,
         settings.max_cpus_per_worker, "ADVORCH_MAX_CPUS_PER_WORKER"),
    ]  # fmt: skip
    for section_and_field, value, most, setting_name in other_limits:
        if value > most:
            raise field_error(section_and_field, _over_limit(most, setting_name), value)
    for name, amount in spec.resources.custom.items():
        if amount > settings.max_custom_resource_per_worker:
            message = _over_limit(
                settings.max_custom_resource_per_worker, "ADVORCH_MAX_CUSTOM_RESOURCE_PER_WORKER"
            )
            raise field_error(("resources", "custom", name), message, amount)
    if spec.num_trials() > settings.max_trials:
        message = f"expands to {spec.num_trials()} trials; " + _over_limit(
            settings.max_trials, "ADVORCH_MAX_TRIALS"
        )
        raise field_error(("sweep",), message, spec.num_trials())


def _over_limit(limit: float, setting: str) -> str:
    return f"at most {limit} allowed on this server ({setting})"


def get_job(
    session: Session, job_id: str, *, visible_to: User | None = None, with_trials: bool = False
) -> Job:
    """The job ``job_id``. With ``visible_to``, only if that user may see it (their own job,
    or any for an admin): another user's job is as unknown as one that does not exist, so job
    ids cannot be probed. ``with_trials``: its trials and owner come in the same query (what
    a job's page shows needs both)."""
    options = [joinedload(Job.trials), joinedload(Job.owner)] if with_trials else []
    job = session.get(Job, job_id, options=options)
    if visible_to is not None:
        ensure_visible(job_id, None if job is None else job.owner_id, visible_to)
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    return job


class JobStamp(NamedTuple):
    """What changes whenever anything a job's page shows does: the job's version, and its
    trials' count and summed versions (every ORM write bumps a row's version; trials are only
    ever added). Stamps of one job only grow, field by field."""

    version: int
    trials: int
    trial_versions: int

    @classmethod
    def of(cls, job: Job) -> JobStamp:
        return cls(job.version, len(job.trials), sum(trial.version for trial in job.trials))


def _with_stamps(column: InstrumentedAttribute[Any]) -> Select[tuple[Any, int, int, int]]:
    """``column`` of each job, then its :class:`JobStamp` as SQL computes it (what
    :meth:`JobStamp.of` computes from loaded rows): its version, its trials' count and the sum
    of their versions. Group by the job's columns."""
    return select(
        column, Job.version, func.count(Trial.id), func.coalesce(func.sum(Trial.version), 0)
    ).outerjoin(Trial, Trial.job_id == Job.id)


def job_stamp(session: Session, job_id: str) -> tuple[int, JobStamp] | None:
    """The job's owner and its :class:`JobStamp`, in one small query (None: no such job)."""
    query = (
        _with_stamps(Job.owner_id)
        .where(Job.id == job_id)
        .group_by(Job.id, Job.owner_id, Job.version)
    )
    row = session.execute(query).first()
    if row is None:
        return None
    owner_id, version, trials, trial_versions = row
    return owner_id, JobStamp(version, trials, int(trial_versions))


def ensure_visible(job_id: str, owner_id: int | None, visible_to: User) -> None:
    """JobNotFound unless ``visible_to`` may see the job (owned by ``owner_id``; None: there is
    no such job), as :func:`get_job` decides."""
    if owner_id is None or (not visible_to.is_admin and owner_id != visible_to.id):
        raise JobNotFound(f"no job {job_id!r}")


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None,
    limit: int,
    offset: int,
    owner_id: int | None = None,
) -> tuple[list[Job], int]:
    """One page of jobs (of one owner, given ``owner_id``), newest first, and how many match
    in all."""
    stamps, total = list_job_stamps(
        session, status=status, limit=limit, offset=offset, owner_id=owner_id
    )
    return jobs_with_trials(session, [job_id for job_id, _ in stamps]), total


def list_job_stamps(
    session: Session,
    *,
    status: JobStatus | None,
    limit: int,
    offset: int,
    owner_id: int | None = None,
) -> tuple[list[tuple[str, JobStamp]], int]:
    """The ids and :class:`JobStamp` s of one page of jobs, as :func:`list_jobs` orders them,
    and how many match in all: two small queries, whatever the page holds."""
    filters = []
    if status is not None:
        filters.append(Job.status == status)
    if owner_id is not None:
        filters.append(Job.owner_id == owner_id)
    total = session.scalar(select(func.count()).select_from(Job).where(*filters)) or 0
    page = (
        _with_stamps(Job.id)
        .where(*filters)
        .group_by(Job.id, Job.version, Job.created_at)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
        .offset(offset)
    )
    stamps = [
        (job_id, JobStamp(version, trials, int(trial_versions)))
        for job_id, version, trials, trial_versions in session.execute(page)
    ]
    return stamps, total


def jobs_with_trials(session: Session, job_ids: list[str]) -> list[Job]:
    """The jobs ``job_ids``, in that order, with their trials and owners (two queries)."""
    if not job_ids:
        return []
    query = (
        select(Job)
        .where(Job.id.in_(job_ids))
        .options(selectinload(Job.trials), joinedload(Job.owner))
    )
    found = {job.id: job for job in session.scalars(query)}
    return [found[job_id] for job_id in job_ids if job_id in found]


def cancel_job(
    session: Session, job: Job, *, by: User | None = None, reason: str | None = None
) -> Job:
    """Cancel at once, by user ``by`` (whom the reason names and the audit trail records). A
    job already on Ray is flagged for the dispatcher to stop there. Raises IllegalTransition
    when the job has finished."""
    if reason is None:
        reason = f"cancelled by {by.name}" if by is not None else "cancelled by user"
    for _ in range(MAX_CONFLICT_RETRIES):
        _ensure_allowed(job, JobStatus.CANCELLED)
        job.ray_cleanup_pending = job.ray_submission_id is not None
        if by is not None:  # added again on each try: a lost race rolls it back
            session.add(audit_event(Actor.of_user(by), AuditAction.JOB_CANCEL, job.id, reason))
        try:
            return transition(session, job, JobStatus.CANCELLED, reason=reason)
        except ConcurrentUpdate:
            continue  # the dispatcher submitted it meanwhile: cancel what it is now
    raise ConcurrentUpdate(f"job {job.id} keeps changing; try again")


def get_trial(session: Session, job: Job, key: str) -> Trial:
    trial = _find_trial(session, job, key)
    if trial is None:
        raise TrialNotFound(f"job {job.id!r} has no trial {key!r}")
    return trial


def job_progress(job: Job) -> Progress:
    statuses = [trial.status for trial in job.trials]
    return Progress(
        trials_total=job.num_trials,
        trials_done=sum(status in TRIAL_FINISHED for status in statuses),
        trials_running=statuses.count(TrialStatus.RUNNING),
    )


def checkpoint_key(trial: Trial) -> str:
    """Where the artifact store keeps a trial's best checkpoint (named by its content)."""
    if trial.checkpoint_sha256 is None:
        raise CheckpointUnavailable(
            f"trial {trial.key!r} has no checkpoint: it has not finished a validated epoch"
        )
    return checkpoint_store_key(trial.job_id, trial.key, trial.checkpoint_sha256)


def checkpoint_store_key(job_id: str, trial_key: str, sha256: str) -> str:
    return f"checkpoints/{job_id}/{trial_key}/{sha256}.pt"


def ray_logs(job: Job, read_logs: Callable[[str], str | None]) -> str:
    """The log of the job's Ray Job, read by ``read_logs(submission_id)`` (None: Ray has no
    such job, e.g. a cluster restarted since)."""
    if job.ray_submission_id is None:
        raise LogsUnavailable(f"job {job.id!r} has not been submitted to Ray: it has no log yet")
    logs = read_logs(job.ray_submission_id)
    if logs is None:
        raise LogsUnavailable(f"the Ray cluster has no job {job.ray_submission_id!r} any more")
    return logs


# --- the state machine (users, workers, the dispatcher and the reconciler) ---


def transition(
    session: Session, job: Job, to: JobStatus, *, reason: str, error: str | None = None
) -> Job:
    """Move ``job`` to status ``to``, recording why; commits.

    Raises IllegalTransition when the state machine has no such change (changing nothing),
    and ConcurrentUpdate when another writer changed the job first (the job is reloaded).
    """
    _ensure_allowed(job, to)
    now = utcnow()
    session.add(JobEvent(job=job, from_status=job.status, to_status=to, reason=reason))
    job.status = to
    if to == JobStatus.RUNNING and job.started_at is None:
        job.started_at = now
    if to in FINISHED:
        job.finished_at = now
    if error is not None:
        job.error = error
    if to in FINISHED:
        _end_open_trials(job, to, reason=reason, error=error)
    try:
        session.commit()
    except StaleDataError as err:
        session.rollback()
        session.refresh(job)
        raise ConcurrentUpdate(f"job {job.id} changed meanwhile; it is now {job.status}") from err
    return job


def _end_open_trials(job: Job, to: JobStatus, *, reason: str, error: str | None) -> None:
    """End every trial of ``job`` still pending or running, as the job ends with ``to``: with
    the job when it is cancelled, and failed otherwise (its own end never arrived)."""
    if to == JobStatus.CANCELLED:
        status, why = TrialStatus.CANCELLED, reason
    elif to == JobStatus.SUCCEEDED:
        status, why = TrialStatus.FAILED, "its end was never reported: the job ended first"
    else:
        status, why = TrialStatus.FAILED, f"the job failed while it ran: {error or reason}"
    for trial in job.trials:
        if trial.status not in TRIAL_FINISHED:
            trial.status, trial.reason = status, why


def get_open_job(session: Session, job_id: str) -> Job:
    """The job ``job_id`` while its workers may still write to it (JobEnded after)."""
    job = get_job(session, job_id)
    ensure_open(job)
    return job


def ensure_open(job: Job) -> None:
    """Raise JobEnded unless the job's workers may still write to it."""
    if job.status in FINISHED:
        raise JobEnded(f"job {job.id} has ended ({job.status}); it takes no more reports")


def _ensure_allowed(job: Job, to: JobStatus) -> None:
    if to not in ALLOWED_TRANSITIONS[job.status]:
        raise IllegalTransition(f"job {job.id} is {job.status}; it cannot become {to}")


def mark_submitted(
    session: Session, job: Job, *, ray_submission_id: str, dashboard_url: str
) -> Job:
    """queued -> submitted, with where it runs on Ray; commits.

    Raises IllegalTransition when the job is no longer queued (a user cancelled it while it was
    being submitted): the caller then stops the Ray job it has just submitted.
    """
    _ensure_allowed(job, JobStatus.SUBMITTED)
    job.ray_submission_id = ray_submission_id
    job.dashboard_url = dashboard_url
    submitted = transition(session, job, JobStatus.SUBMITTED, reason="submitted to Ray")
    DISPATCH_LATENCY.observe((utcnow() - job.created_at).total_seconds())
    return submitted


def jobs_in_status(session: Session, *statuses: JobStatus) -> list[Job]:
    """Jobs in any of ``statuses``, oldest first (the order the dispatcher serves them).

    Like :func:`jobs_pending_ray_cleanup`, it reloads jobs the session already holds, so a
    long-lived session (the dispatcher's loop) sees what other writers have done since.
    """
    query = select(Job).where(Job.status.in_(statuses)).order_by(Job.created_at, Job.id)
    return list(session.scalars(query.execution_options(populate_existing=True)))


def jobs_pending_ray_cleanup(session: Session) -> list[Job]:
    query = select(Job).where(Job.ray_cleanup_pending.is_(True)).order_by(Job.created_at)
    return list(session.scalars(query.execution_options(populate_existing=True)))


def mark_ray_cleaned(session: Session, job: Job) -> None:
    """The dispatcher has stopped this cancelled job on Ray; commits."""
    job.ray_cleanup_pending = False
    try:
        session.commit()
    except StaleDataError as err:
        session.rollback()
        raise ConcurrentUpdate(f"job {job.id} changed meanwhile") from err


# --- what workers report (the internal routes) ---

P = ParamSpec("P")
R = TypeVar("R")


def _retry_on_conflict(
    operation: Callable[Concatenate[Session, P], R],
) -> Callable[Concatenate[Session, P], R]:
    """Run a worker write again when a concurrent one got there first: it inserted the same
    row (a unique-key clash) or changed the trial this one read. The next run reads what is
    there now and merges into it, so both posts count."""

    @functools.wraps(operation)
    def run(session: Session, *args: P.args, **kwargs: P.kwargs) -> R:
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                return operation(session, *args, **kwargs)
            except (IntegrityError, StaleDataError):
                session.rollback()
        return operation(session, *args, **kwargs)

    return run


def record_job_event(
    session: Session, job: Job, to: JobStatus, *, reason: str, error: str | None = None
) -> Job:
    """A worker's report of the job's status: the status it already has is a no-op (no second
    event), an illegal one raises IllegalTransition. A change that loses a race with another
    writer is decided again on the reloaded job. The audit trail records the job's worker."""
    for _ in range(MAX_CONFLICT_RETRIES):
        if job.status == to:
            return job
        _ensure_allowed(job, to)
        detail = f"{job.status} -> {to}: {reason}"
        session.add(audit_event(Actor.of_worker(job.id), AuditAction.JOB_REPORT, job.id, detail))
        try:
            return transition(session, job, to, reason=reason, error=error)
        except ConcurrentUpdate:
            continue
    raise ConcurrentUpdate(f"job {job.id} keeps changing; try again")


@_retry_on_conflict
def upsert_trial(
    session: Session,
    job: Job,
    key: str,
    *,
    config: dict[str, Any] | None = None,
    status: TrialStatus | None = None,
    error: str | None = None,
    reason: str | None = None,
    **results: Any,
) -> Trial:
    """Create or update a trial; commits. Its status only moves forward, a value given replaces
    one stored but a None never erases one, and a trial that ends otherwise than succeeded
    always says why (its error's first line when its report gave no reason). ``results`` are
    Trial's result columns (clean_acc, robust_acc, autoattack_acc, autoattack, best_epoch,
    val_clean_acc, val_robust_acc)."""
    check_epoch(job, "best_epoch", results.get("best_epoch"))
    trial = _find_or_add_trial(session, job, key, status=TrialStatus.PENDING)
    if config:
        trial.config = config
    if status is not None:
        _advance(trial, status)
    _merge(trial, error=error, reason=reason, **results)
    if trial.status in DEFAULT_TRIAL_REASONS and not trial.reason:
        trial.reason = (trial.error or "").strip().split("\n")[0] or DEFAULT_TRIAL_REASONS[
            trial.status
        ]
    session.commit()
    return trial


@_retry_on_conflict
def record_checkpoint(
    session: Session, job: Job, key: str, *, epoch: int, sha256: str, size: int
) -> tuple[Trial, str | None]:
    """Point a trial at the checkpoint of its best epoch ``epoch``, already in the artifact
    store under its content's name; commits. An older epoch than the one it has changes
    nothing (a late retry). Returns the trial and the store key of a checkpoint no longer
    pointed at (the one replaced, or the one refused), for the caller to delete."""
    check_epoch(job, "epoch", epoch)
    trial = _find_or_add_trial(session, job, key, status=TrialStatus.RUNNING)
    uploaded = checkpoint_store_key(job.id, key, sha256)
    current = checkpoint_key(trial) if trial.checkpoint_sha256 is not None else None
    if trial.checkpoint_epoch is not None and epoch < trial.checkpoint_epoch:
        return trial, None if uploaded == current else uploaded
    trial.checkpoint_epoch, trial.checkpoint_sha256, trial.checkpoint_bytes = epoch, sha256, size
    session.commit()
    return trial, None if current == uploaded else current


@_retry_on_conflict
def record_curve_point(
    session: Session, job: Job, key: str, *, epsilon: float, **values: Any
) -> CurvePoint:
    """Create or update the point at ``epsilon`` of an evaluate job's robustness curve
    (``values`` by CurvePoint's column names); commits."""
    trial = _find_or_add_trial(session, job, key, status=TrialStatus.RUNNING)
    point = session.scalar(
        select(CurvePoint).where(CurvePoint.trial_id == trial.id, CurvePoint.epsilon == epsilon)
    )
    if point is None:
        point = CurvePoint(trial_id=trial.id, epsilon=epsilon)
        session.add(point)
    _merge(point, **values)
    session.commit()
    return point


@_retry_on_conflict
def record_epoch_metrics(
    session: Session, job: Job, key: str, *, epoch: int, **metrics: float | None
) -> TrialMetric:
    """Create or update one epoch's metrics of a trial (``metrics`` by TrialMetric's column
    names; a None never erases a value stored); commits. A trial not reported yet is created,
    running: metrics mean it runs.

    The row is written by one INSERT ... ON CONFLICT DO UPDATE (SQLite and PostgreSQL alike),
    not read and then written: two posts of the same epoch cannot clash on its key, and a post
    costs one statement fewer."""
    check_epoch(job, "epoch", epoch)
    trial = _find_or_add_trial(session, job, key, status=TrialStatus.RUNNING)
    _advance(trial, TrialStatus.RUNNING)
    unknown = set(metrics) - set(METRIC_COLUMNS)
    if unknown:
        raise TypeError(f"no such epoch metrics: {sorted(unknown)}")
    # Every column in every statement (None where not given); COALESCE keeps a stored value
    # where this post has none.
    values = {name: metrics.get(name) for name in METRIC_COLUMNS}
    row = session.scalars(
        _epoch_metrics_upsert(session.get_bind().dialect.name),
        {"trial_id": trial.id, "epoch": epoch, "created_at": utcnow(), **values},
        execution_options={"populate_existing": True},
    ).one()
    session.commit()
    EPOCH_METRICS_POSTED.inc()
    return row


METRIC_COLUMNS = tuple(
    column.name
    for column in TrialMetric.__table__.columns
    if column.name not in ("trial_id", "epoch", "created_at")
)


@functools.cache
def _epoch_metrics_upsert(dialect: str) -> ReturningInsert[TrialMetric]:
    """The upsert of one epoch's row, built once per dialect with bound parameters: building
    it per post (``Insert.excluded`` makes a new alias each time) and computing its cache key
    were a fifth of a post's CPU."""
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    table = TrialMetric.__table__.c
    names = ("trial_id", "epoch", "created_at", *METRIC_COLUMNS)
    statement = insert(TrialMetric).values(
        {name: bindparam(name, type_=table[name].type) for name in names}
    )
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[table.trial_id, table.epoch],
        set_={name: func.coalesce(excluded[name], table[name]) for name in METRIC_COLUMNS},
    ).returning(TrialMetric)


def _find_trial(session: Session, job: Job, key: str) -> Trial | None:
    return session.scalar(select(Trial).where(Trial.job_id == job.id, Trial.key == key))


def _find_or_add_trial(session: Session, job: Job, key: str, *, status: TrialStatus) -> Trial:
    trial = _find_trial(session, job, key)
    if trial is None:
        check_trial_key(job, key)
        trial = Trial(job_id=job.id, key=key, config={}, status=status)
        session.add(trial)
        session.flush()  # a concurrent insert of the same key clashes here, and is retried
    return trial


def check_trial_key(job: Job, key: str) -> None:
    """Only keys the job's sweep can make name a trial: ``trial_NNNN`` below its trial count."""
    match = TRIAL_KEY.match(key)
    if match is None or int(match.group(1)) >= job.num_trials:
        raise InvalidReport(
            "trial_key",
            f"job {job.id} has {job.num_trials} trial(s), trial_0000 to "
            f"trial_{job.num_trials - 1:04d}; it has no {key!r}",
        )


def check_epoch(job: Job, field: str, epoch: int | None) -> None:
    """An epoch a trial of the job can reach: 1 to its spec's epochs."""
    epochs = int(job.spec["training"]["epochs"])
    if epoch is not None and not 1 <= epoch <= epochs:
        raise InvalidReport(field, f"job {job.id} trains {epochs} epochs; there is no {epoch}")


def _advance(trial: Trial, status: TrialStatus) -> None:
    if TRIAL_STATUS_RANK[status] > TRIAL_STATUS_RANK[trial.status]:
        trial.status = status


def _merge(row: Trial | TrialMetric | CurvePoint, **values: Any) -> None:
    for name, value in values.items():
        if value is not None:
            setattr(row, name, value)
