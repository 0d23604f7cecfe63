"""Alembic's entry point: run the migrations against the service's database.

The URL comes from ``service.db.alembic_config`` when the service migrates (server start,
``advorch db upgrade``), or from the ADVORCH_ settings when the alembic CLI runs.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import text

from service.db import make_engine
from service.models import Base
from service.settings import get_settings

config = context.config
if config.config_file_name is not None:  # the alembic CLI; the server keeps its own logging
    fileConfig(config.config_file_name)

# Any fixed number: the key of the lock that keeps two API replicas from migrating at once.
POSTGRES_MIGRATION_LOCK = 0x616476


def run_migrations_offline() -> None:
    context.configure(
        url=config.attributes.get("database_url") or get_settings().resolved_database_url,
        target_metadata=Base.metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.attributes.get("database_url") or get_settings().resolved_database_url
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                # SQLite cannot ALTER most things in place; batch mode copies the table.
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"),
                        {"key": POSTGRES_MIGRATION_LOCK},
                    )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
