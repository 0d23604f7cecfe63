"""All of advorch's configuration, in one place: environment variables prefixed ``ADVORCH_``.

The embedded default needs none of them: a SQLite file, checkpoints and data under
``ADVORCH_HOME`` (``~/.advorch``), and a local Ray head started by ``advorch serve``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADVORCH_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".advorch")
    # None: a SQLite file under home. Production: postgresql+psycopg://user@host/db
    database_url: str | None = None
    # None: `advorch serve` starts a local Ray head. Otherwise the address of a cluster.
    ray_address: str | None = None
    # None: a token is generated at first start and kept in home/api_token (mode 0600).
    api_token: SecretStr | None = None
    # The server secret that job-scoped worker tokens are derived from (HMAC); None: generated
    # at first start and kept in home/secret_key (mode 0600).
    secret_key: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # The URL workers post results back to; None: http://host:port
    public_url: str | None = None
    # Where data sets such as cifar-10-batches-py live; None: home/data
    data_dir: Path | None = None
    # Where checkpoints go (a folder, or shared storage on a cluster); None: home/storage
    storage_uri: str | None = None
    # How long start-up waits for a PostgreSQL server that does not answer yet (a container
    # started beside it), trying every few seconds, before it gives up with one line.
    db_connect_timeout_s: float = 60.0

    # Limits that protect the cluster; a spec above them is refused with 422.
    max_epochs: int = 500
    max_trials: int = 256
    max_workers: int = 16
    max_batch_size: int = 4096
    max_request_bytes: int = 1_000_000

    # How often the dispatcher looks for queued jobs and the reconciler compares DB and Ray.
    dispatch_interval_s: float = 1.0
    reconcile_interval_s: float = 15.0

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'advorch.db'}"

    @property
    def resolved_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir or self.home / "data"

    @property
    def resolved_storage_uri(self) -> str:
        return self.storage_uri or str(self.home / "storage")

    @property
    def api_token_file(self) -> Path:
        return self.home / "api_token"

    @property
    def secret_key_file(self) -> Path:
        return self.home / "secret_key"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment (tests build their own)."""
    return Settings()
