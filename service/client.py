"""A small client of advorch's REST API, for the ``advorch`` CLI and for notebooks.

It finds the service and the user's token, first found first:

    URL:    ADVORCH_PUBLIC_URL, the CLI's config file, http://ADVORCH_HOST:ADVORCH_PORT
    token:  ADVORCH_API_TOKEN, the CLI's config file, $ADVORCH_HOME/api_token (the bootstrap
            admin's, on the service's own machine)

The CLI's config file (``ADVORCH_CONFIG_FILE``, by default ``~/.config/advorch/config.toml``)
is what ``advorch login`` writes, mode 0600: ``url = "..."`` and ``token = "..."``. Every API
error becomes one ``ApiError`` whose message is the server's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings


@dataclass(frozen=True)
class CliConfig:
    """What ``advorch login`` keeps: the service's URL and the user's token."""

    url: str | None = None
    token: str | None = None


def read_cli_config(path: Path) -> CliConfig:
    """The CLI's config file; empty when there is none."""
    if not path.exists():
        return CliConfig()
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ApiError(f"{path} is not valid TOML ({err}): fix it, or run `advorch login`") from err
    url, token = data.get("url"), data.get("token")
    return CliConfig(
        url=url if isinstance(url, str) else None, token=token if isinstance(token, str) else None
    )


def service_url(settings: Settings, config: CliConfig) -> str:
    """The service's URL: ADVORCH_PUBLIC_URL, else the config file's, else HOST:PORT's."""
    return settings.public_url or config.url or settings.resolved_public_url


def write_cli_config(path: Path, config: CliConfig) -> None:
    """Write the CLI's config file, readable by its owner only (0600, in a 0700 folder when it
    makes one): it holds a token."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A JSON string is a TOML basic string (the same escapes), so no TOML writer is needed.
    lines = [f"{key} = {json.dumps(value)}" for key, value in vars(config).items() if value]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)  # a file that was there already keeps its mode through O_CREAT
        file.write("\n".join(lines) + "\n")


class ApiError(Exception):
    """An error answered by the API (or no answer at all), as one line for a person."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AdvorchClient:
    def __init__(self, base_url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> AdvorchClient:
        """The client of the service these settings (and the CLI's config file) describe;
        reads, never creates, the token."""
        config = read_cli_config(settings.resolved_config_file)
        if settings.api_token is not None:
            token = settings.api_token.get_secret_value()
        elif config.token is not None:
            token = config.token
        elif settings.api_token_file.exists():
            token = settings.api_token_file.read_text().strip()
        else:
            raise ApiError(
                "no API token: run `advorch login` with the token an admin gave you, set "
                "ADVORCH_API_TOKEN, or start the service once (`advorch serve`) so that it "
                f"writes {settings.api_token_file}"
            )
        return cls(service_url(settings, config), token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdvorchClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- who is calling, and accounts (admins) ---

    def me(self) -> dict[str, Any]:
        return self._json("GET", "/v1/me")

    def create_user(self, name: str, *, admin: bool = False) -> dict[str, Any]:
        return self._json("POST", "/v1/users", json={"name": name, "admin": admin})

    def list_users(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/users"))

    def disable_user(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/users/{name}")

    def set_limits(self, name: str, overrides: dict[str, int | None]) -> dict[str, Any]:
        return self._json("PATCH", f"/v1/users/{name}", json=overrides)

    def issue_token(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/users/{name}/tokens")

    def revoke_token(self, name: str, token_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/users/{name}/tokens/{token_id}")

    def audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if actor:
            params["actor"] = actor
        if action:
            params["action"] = action
        return self._json("GET", "/v1/audit", params=params)

    # --- jobs ---

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/jobs", json=spec)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        owner: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if owner:
            params["owner"] = owner
        return self._json("GET", "/v1/jobs", params=params)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def logs(self, job_id: str) -> str:
        return str(self._json("GET", f"/v1/jobs/{job_id}/logs")["logs"])

    # --- results ---

    def trials(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._json("GET", f"/v1/jobs/{job_id}/trials"))

    def metrics(self, job_id: str, trial_key: str) -> list[dict[str, Any]]:
        return list(self._json("GET", f"/v1/jobs/{job_id}/trials/{trial_key}/metrics"))

    def tradeoff(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/tradeoff")

    def curve(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._json("GET", f"/v1/jobs/{job_id}/curve"))

    def download_checkpoint(self, job_id: str, trial_key: str, destination: Path) -> Path:
        """Write the trial's best checkpoint to ``destination``, whole or not at all: it is
        written aside, checked against the SHA-256 the service sent, then renamed into place,
        so a broken transfer leaves no truncated file (and raises ApiError)."""
        url = f"/v1/jobs/{job_id}/trials/{trial_key}/checkpoint"
        destination.parent.mkdir(parents=True, exist_ok=True)
        draft = destination.with_name(f".{destination.name}.part")
        try:
            with self._http.stream("GET", url) as response:
                if response.is_error:
                    response.read()
                    raise _api_error(response)
                digest = hashlib.sha256()
                with draft.open("wb") as file:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        file.write(chunk)
                expected = response.headers.get("x-content-sha256")
            if expected is not None and expected != digest.hexdigest():
                raise ApiError(f"the checkpoint arrived damaged (SHA-256 {digest.hexdigest()})")
            draft.replace(destination)
        except httpx.TransportError as err:
            raise ApiError(f"the download of {job_id}/{trial_key} broke off: {err}") from err
        finally:
            draft.unlink(missing_ok=True)
        return destination

    # --- models to evaluate ---

    def upload_model(self, path: Path) -> dict[str, Any]:
        """Upload a model file (an advorch checkpoint or a .pt2 program) for evaluate jobs."""
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with path.open("rb") as file:
            return self._json(
                "POST",
                "/v1/models",
                params={"filename": path.name},
                content=file,
                headers={"X-Content-SHA256": digest, "Content-Type": "application/octet-stream"},
            )

    def models(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/models"))

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as err:
            raise ApiError(
                f"cannot reach the advorch service at {self._http.base_url}: {err}"
            ) from err
        if response.is_error:
            raise _api_error(response)
        return response.json()


def _api_error(response: httpx.Response) -> ApiError:
    """The API's own message (its one error shape), or the status line when there is none."""
    try:
        body = response.json()
        message = str(body["error"]["message"])  # names every invalid field already
    except (ValueError, KeyError, TypeError):
        message = f"{response.status_code} {response.reason_phrase}"
    return ApiError(message, response.status_code)
