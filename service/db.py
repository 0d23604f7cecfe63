"""Engines, sessions and schema migrations, for SQLite (the default) and PostgreSQL alike.

The schema is only ever made by Alembic (``migrations/``): the server upgrades on start and
``advorch db upgrade`` does the same by hand, both through :func:`upgrade_database`. Before
migrating, it waits for a PostgreSQL server that is not up yet (one log line per try, for a
bounded time) and refuses a database it cannot use, each with :class:`DatabaseUnusable`: one
line that says what is wrong and what to do.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
CONNECT_RETRY_INTERVAL_S = 2.0


class DatabaseUnusable(RuntimeError):
    """The database cannot be reached or used; the message is one line saying why and what
    to do, for the command line and the container log (never a traceback)."""


def make_engine(
    url: str, *, pool_size: int | None = None, sqlite_synchronous: str = "NORMAL"
) -> Engine:
    """An engine for ``url``; for a SQLite file, its folder is made when missing.

    ``pool_size``: connections kept open (and as many again opened under a burst); None is
    SQLAlchemy's default. ``sqlite_synchronous``: SQLite's ``synchronous`` pragma (NORMAL or
    FULL; see Settings.sqlite_synchronous)."""
    pool_args: dict[str, Any] = (
        {} if pool_size is None else {"pool_size": pool_size, "max_overflow": pool_size}
    )
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        if sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"sqlite_synchronous must be one of {SQLITE_SYNCHRONOUS}")
        # Wait up to 30 s for another writer (the dispatcher) instead of failing at once.
        engine = create_engine(url, connect_args={"timeout": 30}, **pool_args)
        event.listen(
            engine,
            "connect",
            lambda connection, _record: _configure_sqlite(connection, sqlite_synchronous),
        )
        return engine
    return create_engine(url, pool_pre_ping=True, **pool_args)


SQLITE_SYNCHRONOUS = ("NORMAL", "FULL")


def engine_from_settings(settings: Settings) -> Engine:
    """The service's engine: its database, pool size and SQLite durability as configured."""
    return make_engine(
        settings.resolved_database_url,
        pool_size=settings.db_pool_size,
        sqlite_synchronous=settings.sqlite_synchronous,
    )


def _configure_sqlite(dbapi_connection: Any, synchronous: str) -> None:
    cursor = dbapi_connection.cursor()
    # SQLite leaves foreign keys off unless asked; deleting a job must delete its trials.
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL lets the API read while the dispatcher (another process) writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs the log at checkpoints, not at every commit: a commit costs no
    # fsync, and a power loss (not a crash of the process) may lose the last commits but never
    # corrupts the database. FULL syncs every commit.
    cursor.execute(f"PRAGMA synchronous={synchronous}")
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


def upgrade_database(url: str, connect_timeout_s: float = 0.0) -> None:
    """Bring the database at ``url`` to the newest schema (creating it when empty). A PostgreSQL
    server that does not answer is tried again for up to ``connect_timeout_s``."""
    if make_url(url).get_backend_name() == "postgresql":
        check_postgres_database(url, connect_timeout_s)
    command.upgrade(alembic_config(url), "head")


def check_postgres_database(url: str, connect_timeout_s: float) -> None:
    """Connect to the PostgreSQL database at ``url``, trying again every few seconds for up to
    ``connect_timeout_s``, and check that advorch can use it (its encoding is UTF8).

    Raises :class:`DatabaseUnusable` when it cannot connect in time or the database is unfit.
    """
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    # The driver's own connection: SQLAlchemy's first connect already fails on a SQL_ASCII
    # database (its version check runs a regex on the bytes such a database returns).
    dialect = create_engine(parsed).dialect
    args, params = dialect.create_connect_args(parsed)
    params.setdefault("connect_timeout", 10)
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            connection = dialect.connect(*args, **params)
            break
        except dialect.loaded_dbapi.OperationalError as err:
            reason = " ".join(str(err).split())  # the driver's message spans several lines
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise DatabaseUnusable(
                    f"cannot connect to the database at {shown}: {reason} "
                    f"(gave up after {connect_timeout_s:g} s; ADVORCH_DB_CONNECT_TIMEOUT_S sets "
                    "how long to wait)"
                ) from None
            wait_s = min(CONNECT_RETRY_INTERVAL_S, left_s)
            log.warning(
                "database at %s not reachable: %s; trying again in %.0f s (giving up in %.0f s)",
                shown,
                reason,
                wait_s,
                left_s,
            )
            time.sleep(wait_s)
    try:
        cursor = connection.cursor()
        cursor.execute(
            "SELECT pg_encoding_to_char(encoding) FROM pg_database "
            "WHERE datname = current_database()"
        )
        (encoding,) = cursor.fetchone() or ("unknown",)
    finally:
        connection.close()
    if isinstance(encoding, bytes):  # what a SQL_ASCII database returns for text
        encoding = encoding.decode("ascii")
    if encoding != "UTF8":
        raise DatabaseUnusable(
            f"the database at {shown} has encoding {encoding}; advorch needs UTF8: create it "
            f"with CREATE DATABASE {parsed.database} ENCODING 'UTF8' TEMPLATE template0 "
            "(or a server made by initdb -E UTF8)"
        )


def downgrade_database(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
