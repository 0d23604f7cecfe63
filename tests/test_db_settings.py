"""The database settings: SQLite's durability (ADVORCH_SQLITE_SYNCHRONOUS) and the size of
the connection pool (ADVORCH_DB_POOL_SIZE), as the service's engine applies them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.db import engine_from_settings
from service.settings import Settings

# SQLite's numbers for PRAGMA synchronous.
SQLITE_NORMAL, SQLITE_FULL = 1, 2


@pytest.mark.parametrize(
    ("configured", "expected"),
    [(None, SQLITE_NORMAL), ("NORMAL", SQLITE_NORMAL), ("FULL", SQLITE_FULL)],
)
def test_sqlite_syncs_at_checkpoints_unless_told_full(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    configured: str | None,
    expected: int,
) -> None:
    """The default is NORMAL in WAL mode (a commit costs no fsync); ADVORCH_SQLITE_SYNCHRONOUS=FULL
    brings back a sync per commit. Every connection of the pool gets it."""
    if configured is not None:
        monkeypatch.setenv("ADVORCH_SQLITE_SYNCHRONOUS", configured)
    settings = Settings(home=tmp_path)
    engine = engine_from_settings(settings)
    try:
        with engine.connect() as first, engine.connect() as second:
            for connection in (first, second):
                assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == expected
    finally:
        engine.dispose()


def test_an_unknown_sqlite_synchronous_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVORCH_SQLITE_SYNCHRONOUS", "OFF")  # would risk corruption: not offered
    with pytest.raises(ValidationError, match="sqlite_synchronous"):
        Settings()


def test_the_pool_holds_db_pool_size_connections_and_as_many_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADVORCH_DB_POOL_SIZE", "7")
    engine = engine_from_settings(Settings(home=tmp_path))
    try:
        assert engine.pool.size() == 7  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 7  # type: ignore[attr-defined]
    finally:
        engine.dispose()
