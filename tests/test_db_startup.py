"""Start-up on a database advorch cannot use: one line that says what is wrong and what to do,
never a driver's traceback. A PostgreSQL database in SQL_ASCII (psycopg returns its text as
bytes, and the migrations died in a TypeError) is refused; a server that does not answer is
tried again, one log line per try, until ADVORCH_DB_CONNECT_TIMEOUT_S, then given up on."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

from service.db import DatabaseUnusable, upgrade_database
from tests.ray_support import run_advorch_process


def run_advorch(
    home: Path, database_url: str, *args: str, timeout_s: float = 3
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ADVORCH_HOME": str(home),
        "ADVORCH_DATABASE_URL": database_url,
        "ADVORCH_DB_CONNECT_TIMEOUT_S": str(timeout_s),
    }
    return run_advorch_process(env, *args)


@pytest.mark.postgres
def test_a_sql_ascii_database_is_refused_in_one_line(
    make_database_url: Callable[..., str], tmp_path: Path
) -> None:
    url = make_database_url("postgres", encoding="SQL_ASCII")
    with pytest.raises(DatabaseUnusable, match=r"has encoding SQL_ASCII; advorch needs UTF8"):
        upgrade_database(url)
    # Refused before any migration ran. (Asked through psycopg itself: SQLAlchemy cannot even
    # connect to such a database.)
    plain_url = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain_url) as connection:
        tables = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchall() == []

    # `advorch serve` refuses it before it starts anything else.
    result = run_advorch(tmp_path, url, "serve")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the database at postgresql+psycopg://")
    assert "encoding SQL_ASCII" in line and "ENCODING 'UTF8' TEMPLATE template0" in line


@pytest.mark.postgres
def test_a_utf8_database_is_accepted(make_database_url: Callable[..., str]) -> None:
    upgrade_database(make_database_url("postgres"))  # the server's default, UTF8, passes


def closed_port() -> int:
    """A port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("command", [["serve"], ["db", "upgrade"]], ids=" ".join)
def test_an_unreachable_database_is_retried_one_line_a_try_then_given_up(
    command: list[str], tmp_path: Path
) -> None:
    url = f"postgresql+psycopg://advorch:secret@127.0.0.1:{closed_port()}/advorch"
    started = time.monotonic()
    result = run_advorch(tmp_path, url, *command, timeout_s=3)
    elapsed_s = time.monotonic() - started

    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "secret" not in output  # the password is never shown
    lines = result.stderr.strip().splitlines()
    *retries, last = lines
    assert len(retries) >= 2, lines  # tried at 0 s and 2 s, given up at 3 s
    for line in retries:
        assert "not reachable" in line and "Connection refused" in line, line
        assert "trying again in" in line, line
    assert last.startswith("error: cannot connect to the database at postgresql+psycopg://")
    assert "gave up after 3 s" in last and "ADVORCH_DB_CONNECT_TIMEOUT_S" in last
    assert elapsed_s < 3 + 30  # the wait is bounded
