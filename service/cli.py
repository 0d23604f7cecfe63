"""The ``advorch`` command: ``advorch serve``, ``advorch db upgrade``.

One Typer app; each command is a small function that reads the settings and calls into the
service. Client commands (submit, jobs, status, ...) are added here the same way.
"""

from __future__ import annotations

import typer

from service.settings import get_settings

app = typer.Typer(
    help="advorch: adversarial training jobs (PGD-AT, TRADES) on Ray, over REST.",
    no_args_is_help=True,
)
db_app = typer.Typer(help="The service's database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.command()
def serve() -> None:
    """Run the API, the dispatcher, the reconciler and a local Ray head (or ADVORCH_RAY_ADDRESS's).

    It upgrades the database first. Ctrl-C or SIGTERM stops all it started.
    """
    # Imported here: the API and Ray are slow imports that other commands do not need.
    from service.serve import serve as run_service

    run_service(get_settings())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the database to the newest schema (advorch serve does this on start)."""
    from service.db import upgrade_database

    settings = get_settings()
    upgrade_database(settings.resolved_database_url)
    typer.echo(f"database at {settings.resolved_database_url} is up to date")


def main() -> None:
    app()
