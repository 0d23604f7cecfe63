"""Model files users upload for evaluate jobs, and what an evaluate job's source resolves to.

An evaluate job attacks one model: a file a user uploaded (``source: {model: ID}``), or the
best checkpoint of an earlier trial (``source: {job: ID, trial: KEY}``). Both live in the
artifact store; the job's worker downloads the one its source names through its internal
route, so it needs no disk shared with the service.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import jobs
from service.artifacts import ReceivedFile
from service.models import Job, UploadedModel, User, new_job_id
from workers.model_format import ModelFormat
from workers.spec import JobSpec, SourceSpec, field_error


class ModelNotFound(Exception):
    pass


def model_key(model_id: str) -> str:
    """Where the artifact store keeps an uploaded model file."""
    return f"models/{model_id}"


def record_model(
    session: Session, owner: User, filename: str, received: ReceivedFile, model_format: ModelFormat
) -> UploadedModel:
    """The uploaded model's row (not committed: the caller stores the file, then commits)."""
    model = UploadedModel(
        id=new_job_id(),
        owner=owner,
        filename=filename,
        format=model_format,
        sha256=received.sha256,
        bytes=received.size,
    )
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, model_id: str, *, visible_to: User) -> UploadedModel:
    """An uploaded model, if ``visible_to`` may use it (their own, or any for an admin)."""
    model = session.get(UploadedModel, model_id)
    if model is None or (not visible_to.is_admin and model.owner_id != visible_to.id):
        raise ModelNotFound(f"no uploaded model {model_id!r}")
    return model


def list_models(session: Session, *, visible_to: User) -> list[UploadedModel]:
    query = select(UploadedModel).order_by(UploadedModel.created_at.desc())
    if not visible_to.is_admin:
        query = query.where(UploadedModel.owner_id == visible_to.id)
    return list(session.scalars(query))


def check_source(session: Session, spec: JobSpec, owner: User) -> None:
    """An evaluate job's source must name a model its owner may use, with a file to attack;
    raises the spec's own ValidationError naming ``source.model`` or ``source.trial``."""
    if spec.kind != "evaluate" or spec.source is None:
        return
    try:
        source_key(session, spec.source, owner)
    except (ModelNotFound, jobs.JobNotFound, jobs.TrialNotFound) as err:
        field = "model" if spec.source.model is not None else "trial"
        raise field_error(("source", field), str(err), getattr(spec.source, field)) from err
    except jobs.CheckpointUnavailable as err:
        raise field_error(("source", "trial"), str(err), spec.source.trial) from err


def source_key(session: Session, source: SourceSpec, owner: User) -> str:
    """The artifact-store key of the file an evaluate job's source names, as its owner sees it:
    the uploaded model, or the trial's best checkpoint as it is now."""
    if source.model is not None:
        return model_key(get_model(session, source.model, visible_to=owner).id)
    assert source.job is not None and source.trial is not None, "SourceSpec validates this"
    source_job = jobs.get_job(session, source.job, visible_to=owner)
    return jobs.checkpoint_key(jobs.get_trial(session, source_job, source.trial))


def job_source_key(session: Session, job: Job) -> str:
    """What the evaluate job ``job`` attacks, for its worker to download."""
    if job.spec.get("source") is None:
        raise ModelNotFound(f"job {job.id!r} is not an evaluate job: it has no source")
    return source_key(session, SourceSpec.model_validate(job.spec["source"]), job.owner)
