"""Liveness and readiness for load balancers and orchestrators: no token needed."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.deps import SessionFactoryDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(session_factory: SessionFactoryDep) -> dict[str, str]:
    """200 when the server can reach its database, 503 when it cannot."""
    try:
        with session_factory() as session:  # taken and given back in this one thread hop
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as err:
        raise HTTPException(503, f"database unreachable: {type(err).__name__}") from err
    return {"status": "ok", "database": "ok"}
