"""Who may call what: the user's API token on the user routes, a job's own worker token on its
internal routes, and nothing else; and the body size limit."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from pydantic import SecretStr

from service.auth import ensure_api_token, worker_token, worker_token_job_id
from service.settings import Settings

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Submit = Callable[..., dict[str, Any]]


@pytest.fixture
def anonymous(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_generated_api_token_is_kept_private(live_server: LiveServer) -> None:
    token_file = live_server.settings.api_token_file
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(live_server.api_token) >= 32


@pytest.mark.parametrize(
    ("path", "with_token"),
    [("/v1/jobs", 200), ("/v1/jobs/some-id", 404), ("/v1/jobs/some-id/trials", 404)],
)
def test_user_routes_need_the_api_token(
    anonymous: httpx.Client, live_server: LiveServer, path: str, with_token: int
) -> None:
    job_token = worker_token(live_server.settings, "some-id")
    for headers in [{}, bearer("wrong"), bearer(job_token), {"Authorization": "Basic dTpw"}]:
        response = anonymous.get(path, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized"
    assert anonymous.post("/v1/jobs", json={"name": "x"}).status_code == 401
    # With the token the route answers as itself: the page of jobs, or no such job.
    answered = anonymous.get(path, headers=bearer(live_server.api_token))
    assert answered.status_code == with_token, answered.text
    if with_token == 200:
        assert set(answered.json()) == {"items", "total", "limit", "offset"}
    else:
        assert answered.json()["error"] == {
            "code": "not_found",
            "message": "no job 'some-id'",
            "fields": [],
        }


def test_internal_routes_take_only_that_jobs_worker_token(
    anonymous: httpx.Client, live_server: LiveServer, submit: Submit
) -> None:
    job_id, other_job_id = submit()["id"], submit()["id"]
    url = f"/v1/internal/jobs/{job_id}/trials/trial_0000"
    body: dict[str, Any] = {"config": {}}
    token = worker_token(live_server.settings, job_id)
    forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
    for headers, status in [
        ({}, 401),
        (bearer("wrong"), 401),
        (bearer(forged), 401),
        (bearer(live_server.api_token), 401),
        (bearer(worker_token(live_server.settings, other_job_id)), 403),
        (bearer(token), 200),
    ]:
        response = anonymous.put(url, json=body, headers=headers)
        assert response.status_code == status, (headers, response.text)
    # Nothing written by the refused calls: one trial, from the last call.
    trials = anonymous.get(f"/v1/jobs/{job_id}/trials", headers=bearer(live_server.api_token))
    assert len(trials.json()) == 1


def test_worker_tokens_are_never_shown_to_users(
    api: httpx.Client, live_server: LiveServer, submit: Submit
) -> None:
    job_id = submit()["id"]
    token = worker_token(live_server.settings, job_id)
    mac = token.split(".", 1)[1]
    for path in ["", "/events", "/trials", "/tradeoff"]:
        assert mac not in api.get(f"/v1/jobs/{job_id}{path}").text
    assert mac not in api.get("/v1/jobs").text


def test_body_above_the_limit_is_413(api: httpx.Client, live_server: LiveServer) -> None:
    limit = live_server.settings.max_request_bytes
    too_big = b'{"name": "' + b"x" * limit + b'"}'

    def streamed() -> Iterator[bytes]:  # no Content-Length: only the stream tells
        for start in range(0, len(too_big), 4096):
            yield too_big[start : start + 4096]

    for content in (too_big, streamed()):
        response = api.post(
            "/v1/jobs", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"
        assert str(limit) in response.json()["error"]["message"]


# --- the tokens themselves ---


def test_ensure_api_token_prefers_the_setting(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, api_token=SecretStr("from-env"))
    assert ensure_api_token(settings) == "from-env"
    assert not settings.api_token_file.exists()


def test_ensure_api_token_creates_prints_once_then_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(home=tmp_path / "home", api_token=None)
    token = ensure_api_token(settings)
    assert token in capsys.readouterr().err
    assert settings.api_token_file.read_text().strip() == token
    assert stat.S_IMODE(settings.api_token_file.stat().st_mode) == 0o600
    assert ensure_api_token(settings) == token
    assert token not in capsys.readouterr().err


def test_worker_tokens_are_per_job_and_per_secret(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, secret_key=None)
    token = worker_token(settings, "job1")
    assert token == worker_token(settings, "job1")
    assert token != worker_token(settings, "job2")
    assert stat.S_IMODE(settings.secret_key_file.stat().st_mode) == 0o600
    assert worker_token_job_id(settings, token) == "job1"
    assert worker_token_job_id(settings, "job1.0123") is None
    assert worker_token_job_id(settings, "no-dot") is None
    assert worker_token_job_id(settings, "job1.ünïcode") is None

    other_server = Settings(home=tmp_path / "other", secret_key=SecretStr("another secret"))
    assert worker_token(other_server, "job1") != token
    assert worker_token_job_id(other_server, token) is None
