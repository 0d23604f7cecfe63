"""Engines, sessions and schema migrations, for SQLite (the default) and PostgreSQL alike.

The schema is only ever made by Alembic (``migrations/``): the server upgrades on start and
``advorch db upgrade`` does the same by hand, both through :func:`upgrade_database`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; for a SQLite file, its folder is made when missing."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # Wait up to 30 s for another writer (the dispatcher) instead of failing at once.
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _configure_sqlite(dbapi_connection: Any, _connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite leaves foreign keys off unless asked; deleting a job must delete its trials.
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL lets the API read while the dispatcher (another process) writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: routes commit, then serialize what they changed.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic's configuration for ``url``, without alembic.ini (which is for the CLI)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an option: a URL may hold '%', which ini files interpolate.
    config.attributes["database_url"] = url
    return config


def upgrade_database(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (creating it when empty)."""
    command.upgrade(alembic_config(url), "head")


def downgrade_database(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
