"""The audit trail: who (a user, or the workers of one job) changed what, and when.

Each operation that changes something adds its :class:`AuditEvent` to the session it commits,
so the change and its record land together or not at all. What is recorded: jobs submitted and
cancelled by users, job status changes reported by a job's workers, users created, disabled and
given other limits, tokens issued and revoked. (The dispatcher's and reconciler's own status
changes are the service's, not a person's: each job's events have them, with their reasons.)
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import ActorKind, AuditAction, AuditEvent, User


@dataclass(frozen=True)
class Actor:
    """Who makes a change: a user by name, or the workers of a job by its id."""

    kind: ActorKind
    name: str

    @classmethod
    def of_user(cls, user: User) -> Actor:
        return cls(ActorKind.USER, user.name)

    @classmethod
    def of_worker(cls, job_id: str) -> Actor:
        return cls(ActorKind.WORKER, job_id)


def audit_event(actor: Actor, action: AuditAction, target: str, detail: str = "") -> AuditEvent:
    """The record of one change, for the caller to add to the session that makes the change."""
    return AuditEvent(
        actor_kind=actor.kind, actor=actor.name, action=action, target=target, detail=detail
    )


def list_audit_events(
    session: Session, *, actor: str | None, action: AuditAction | None, limit: int, offset: int
) -> tuple[list[AuditEvent], int]:
    """One page of the trail, newest first, and how many events match in all."""
    query = select(AuditEvent)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(page)), total
