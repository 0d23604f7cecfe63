"""The migrations, on an empty database of each backend: upgrade to head, down to base and up
again, and at head the tables are exactly what the models say; and an upgrade of a database
that holds jobs already (from before users), and the way back."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.db import alembic_config, downgrade_database, make_engine, upgrade_database
from service.models import Base
from tests.conftest import bearer, serve, server_settings


def schema_differences(url: str) -> list[Any]:
    """What autogenerate would write to make the database match the models."""
    engine = make_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences: list[Any] = compare_metadata(context, Base.metadata)
    engine.dispose()
    return differences


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names


def test_upgrade_downgrade_upgrade_matches_the_models(empty_database_url: str) -> None:
    url = empty_database_url
    model_tables = set(Base.metadata.tables)

    upgrade_database(url)
    assert table_names(url) == model_tables | {"alembic_version"}
    assert schema_differences(url) == []

    downgrade_database(url, "base")
    assert table_names(url) <= {"alembic_version"}
    assert schema_differences(url) != []  # the comparison sees a schema that is not there

    upgrade_database(url)
    assert schema_differences(url) == []
    upgrade_database(url)  # upgrading at head changes nothing
    assert schema_differences(url) == []


# The jobs table as revision 0001 made it: a test of upgrading writes what was there before.
JOBS_0001 = sa.table(
    "jobs",
    sa.column("id", sa.String()),
    sa.column("name", sa.String()),
    sa.column("status", sa.String()),
    sa.column("spec", sa.JSON()),
    sa.column("num_trials", sa.Integer()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
    sa.column("ray_cleanup_pending", sa.Boolean()),
    sa.column("version", sa.Integer()),
)


def test_upgrading_a_database_with_jobs_gives_them_to_the_bootstrap_admin(
    empty_database_url: str, tmp_path: Path
) -> None:
    url = empty_database_url
    command.upgrade(alembic_config(url), "0001")
    now = datetime.now(UTC)
    old_jobs = {"old-queued": "queued", "old-succeeded": "succeeded"}
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(
            JOBS_0001.insert(),
            [
                {
                    "id": f"{index:032x}",
                    "name": name,
                    "status": status,
                    "spec": {"name": name},
                    "num_trials": 1,
                    "created_at": now,
                    "updated_at": now,
                    "ray_cleanup_pending": False,
                    "version": 1,
                }
                for index, (name, status) in enumerate(old_jobs.items())
            ],
        )

    upgrade_database(url)
    assert schema_differences(url) == []
    with engine.connect() as connection:
        admins = connection.execute(sa.text("SELECT id, name, is_admin FROM users")).all()
        owners = connection.execute(sa.text("SELECT owner_id, priority FROM jobs")).all()
    assert [(name, bool(is_admin)) for _, name, is_admin in admins] == [("admin", True)]
    assert owners == [(admins[0][0], "normal")] * 2

    # Over HTTP, with the server's own token: the bootstrap admin's jobs.
    settings = server_settings(tmp_path, url)
    with serve(settings) as server:
        listed = httpx.get(f"{server.url}/v1/jobs", headers=bearer(server.api_token)).json()
    assert {(job["name"], job["owner"], job["status"]) for job in listed["items"]} == {
        (name, "admin", status) for name, status in old_jobs.items()
    }

    downgrade_database(url, "0001")
    assert table_names(url) == {"alembic_version", "jobs", "job_events", "trials", "trial_metrics"}
    with engine.connect() as connection:
        kept = connection.execute(sa.select(JOBS_0001.c.name, JOBS_0001.c.status)).all()
        columns = {column["name"] for column in sa.inspect(connection).get_columns("jobs")}
    assert sorted(kept) == sorted(old_jobs.items())
    assert "owner_id" not in columns and "priority" not in columns

    upgrade_database(url)  # and up again
    assert schema_differences(url) == []
    engine.dispose()
