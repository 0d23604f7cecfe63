"""The audit trail, for admins: who (a user, or a job's workers) changed what, and when."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminDep, SessionDep
from api.errors import error_responses
from api.schemas import MAX_OFFSET, AuditEventPublic, AuditPage
from service.audit import list_audit_events
from service.models import AuditAction

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=error_responses(401, 403, 422))


@router.get("")
def read_audit_trail(
    session: SessionDep,
    admin: AdminDep,
    actor: Annotated[
        str | None,
        Query(description="A user's name, or a job id.", pattern=r"^[A-Za-z0-9_.-]{1,64}$"),
    ] = None,
    action: AuditAction | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> AuditPage:
    """Admins: the trail, newest first, optionally of one actor or one action."""
    page, total = list_audit_events(session, actor=actor, action=action, limit=limit, offset=offset)
    items = [AuditEventPublic.model_validate(event) for event in page]
    return AuditPage(items=items, total=total, limit=limit, offset=offset)
