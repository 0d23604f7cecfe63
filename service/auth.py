"""The service's secrets: the bootstrap admin's API token, and the job-scoped worker tokens.
(Users' own tokens, and how every user token is checked, are in ``service.users``.)

A worker token is ``<job id>.<HMAC-SHA256 of the job id under the server secret>``: the
dispatcher derives it when it submits a job and hands it to the job's workers; nothing stores
it, and it opens that job's internal routes only. Carrying the job id lets the server tell a
token of another job (403) from no token of ours at all (401). Every comparison is in constant
time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
import tempfile
from pathlib import Path

from service.settings import Settings


def ensure_api_token(settings: Settings) -> str:
    """The bootstrap admin's API token: ADVORCH_API_TOKEN, or the one kept in
    ``$ADVORCH_HOME/api_token``, generated (and printed, this once) when there is none yet."""
    if settings.api_token is not None:
        return settings.api_token.get_secret_value()
    token, created = _read_or_create_secret(settings.api_token_file)
    if created:
        print(
            f"advorch: generated an API token, kept in {settings.api_token_file}: {token}",
            file=sys.stderr,
            flush=True,
        )
    return token


def worker_token(settings: Settings, job_id: str) -> str:
    """The token the workers of job ``job_id`` post their results with."""
    mac = hmac.new(_server_secret(settings), job_id.encode(), hashlib.sha256).hexdigest()
    return f"{job_id}.{mac}"


def worker_token_job_id(settings: Settings, presented: str) -> str | None:
    """The job a presented worker token was made for, or None when it is no worker token."""
    job_id, dot, _ = presented.partition(".")
    if not dot or not hmac.compare_digest(
        presented.encode(), worker_token(settings, job_id).encode()
    ):
        return None
    return job_id


# The secret kept in each home's file, once read: it never changes after its first start, and
# every worker post checks a token with it.
_file_secrets: dict[Path, bytes] = {}


def _server_secret(settings: Settings) -> bytes:
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = settings.secret_key_file
    if path not in _file_secrets:
        secret, _ = _read_or_create_secret(path)
        _file_secrets[path] = secret.encode()
    return _file_secrets[path]


def _read_or_create_secret(path: Path) -> tuple[str, bool]:
    """The secret kept at ``path`` (mode 0600) and whether this call created it.

    The file appears whole or not at all (written aside, then linked into place), so two
    processes starting together (the API and the dispatcher) agree on one secret.
    """
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd, draft = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(secret + "\n")
        os.link(draft, path)
    except FileExistsError:
        return path.read_text().strip(), False
    finally:
        os.unlink(draft)
    return secret, True
