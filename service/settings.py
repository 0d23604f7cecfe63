"""All of advorch's configuration, in one place: environment variables prefixed ``ADVORCH_``.

The embedded default needs none of them: a SQLite file, checkpoints and data under
``ADVORCH_HOME`` (``~/.advorch``), and a local Ray head started by ``advorch serve``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADVORCH_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".advorch")
    # None: a SQLite file under home. Production: postgresql+psycopg://user@host/db
    database_url: str | None = None
    # None: `advorch serve` starts a local Ray head. Otherwise the address of a cluster.
    ray_address: str | None = None
    # The bootstrap admin's token (the user named "admin"). None: a token is generated at first
    # start and kept in home/api_token (mode 0600).
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
    # Where Ray Train keeps its own checkpoints (what a restarted worker resumes from): a
    # folder, shared storage on a cluster, or an s3:// URI; None: home/storage
    storage_uri: str | None = None
    # The service's artifact store: trials' best checkpoints and uploaded model files, a folder
    # or an fsspec URL (s3://bucket/prefix); None: home/artifacts
    artifacts: str | None = None
    # Names of the service's own environment variables that every job's processes get too
    # (comma-separated), on every node, through the Ray Job's runtime_env: what a worker needs
    # to reach s3:// storage that the cluster's nodes are not set up for, e.g.
    # AWS_ENDPOINT_URL,AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY. A name the service's
    # environment lacks is left out. Never an ADVORCH_ setting (secrets of the service).
    pass_env: str = ""
    # The CLI's own file (`advorch login` writes the service's URL and the user's token there);
    # None: $XDG_CONFIG_HOME/advorch/config.toml, or ~/.config/advorch/config.toml.
    config_file: Path | None = None
    # How long start-up waits for a PostgreSQL server that does not answer yet (a container
    # started beside it), trying every few seconds, before it gives up with one line.
    db_connect_timeout_s: float = 60.0

    # Limits that protect the cluster; a spec above them is refused with 422.
    max_epochs: int = 500
    max_trials: int = 256
    max_workers: int = 16
    max_batch_size: int = 4096
    max_attack_steps: int = 100
    max_eval_attack_steps: int = 1000
    max_restarts: int = 20
    max_cpus_per_worker: float = 64.0
    # The most of any one custom Ray resource (resources.custom) a worker may reserve.
    max_custom_resource_per_worker: float = 64.0
    max_request_bytes: int = 1_000_000
    # Checkpoint and model uploads have their own limit (WRN-34-10 is about 185 MB).
    max_upload_bytes: int = 1_000_000_000

    # Sharing the cluster: how many jobs the dispatcher keeps on Ray at once (the rest wait,
    # queued, in the database), and each user's limits, which an admin may override per user.
    # Going over a user's limit is a 429 naming it.
    max_running_jobs: int = Field(default=8, ge=1)
    user_max_active_jobs: int = Field(default=50, ge=0)  # queued, submitted and running
    user_max_trials_per_job: int = Field(default=64, ge=1)

    # How often the dispatcher looks for queued jobs and the reconciler compares DB and Ray.
    dispatch_interval_s: float = 1.0
    reconcile_interval_s: float = 15.0
    # How long a trial whose node was lost waits for a live node that can run it again (one
    # that rejoins, or one an autoscaler adds) before its job fails saying the node was lost.
    node_wait_s: float = Field(default=20.0, ge=0)

    # Throughput. `advorch serve` runs the API in this many uvicorn processes sharing one
    # socket (the dispatcher, the reconciler and the migrations run once, in the parent).
    api_workers: int = Field(default=2, ge=1)
    # uvicorn's line per request on stdout.
    access_log: bool = True
    # Database connections each API process keeps open (plus as many again under bursts);
    # SQLAlchemy's default is 5 (plus 10). With PostgreSQL, (API processes + 1) x 2 x this
    # must stay under its max_connections.
    db_pool_size: int = Field(default=10, ge=1)
    # How long a checked token is trusted without asking the database again: a revoked token
    # or a disabled user is refused at most this long after the change (0: every request).
    token_cache_s: float = Field(default=1.0, ge=0)
    # SQLite only: NORMAL (the default; in WAL mode a power loss may lose the last commits,
    # never corrupt the file) or FULL (every commit waits for the disk: slower writes).
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"

    @field_validator("pass_env")
    @classmethod
    def _no_advorch_settings(cls, value: str) -> str:
        for name in value.split(","):
            if name.strip().upper().startswith("ADVORCH_"):
                raise ValueError(f"{name.strip()} is advorch's own setting: jobs never get one")
        return value

    @property
    def passed_env(self) -> dict[str, str]:
        """The variables ``pass_env`` names, with their values in this process's environment."""
        names = [name.strip() for name in self.pass_env.split(",") if name.strip()]
        return {name: os.environ[name] for name in names if name in os.environ}

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
        return self.storage_uri or str((self.home / "storage").absolute())

    @property
    def resolved_config_file(self) -> Path:
        if self.config_file is not None:
            return self.config_file
        xdg_config_home = os.environ.get("XDG_CONFIG_HOME")
        base = Path(xdg_config_home) if xdg_config_home else Path.home() / ".config"
        return base / "advorch" / "config.toml"

    @property
    def resolved_artifacts(self) -> str:
        return self.artifacts or str(self.home / "artifacts")

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
