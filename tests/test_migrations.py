"""The migrations, on an empty database of each backend: upgrade to head, down to base and up
again, and at head the tables are exactly what the models say."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.db import downgrade_database, make_engine, upgrade_database
from service.models import Base


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
