"""A small client of advorch's REST API, for the ``advorch`` CLI and for notebooks.

It finds the service and the user token from the same settings as the server
(``ADVORCH_PUBLIC_URL`` or ``ADVORCH_HOST``/``ADVORCH_PORT``; ``ADVORCH_API_TOKEN`` or
``$ADVORCH_HOME/api_token``) and turns every API error into one ``ApiError`` whose message is
the server's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings


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
        """The client of the service these settings describe; reads, never creates, the token."""
        if settings.api_token is not None:
            token = settings.api_token.get_secret_value()
        elif settings.api_token_file.exists():
            token = settings.api_token_file.read_text().strip()
        else:
            raise ApiError(
                f"no API token: set ADVORCH_API_TOKEN, or start the service once "
                f"(`advorch serve`) so that it writes {settings.api_token_file}"
            )
        return cls(settings.resolved_public_url, token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdvorchClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- jobs ---

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/jobs", json=spec)

    def list_jobs(
        self, *, status: str | None = None, limit: int = 20, offset: int = 0
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
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

    def download_checkpoint(self, job_id: str, trial_key: str, destination: Path) -> Path:
        url = f"/v1/jobs/{job_id}/trials/{trial_key}/checkpoint"
        with self._http.stream("GET", url) as response:
            if response.is_error:
                response.read()
                raise _api_error(response)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with destination.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
        return destination

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
