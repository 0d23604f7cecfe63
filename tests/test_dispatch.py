"""The dispatcher's order, on SQLite and PostgreSQL: jobs submitted over real HTTP by several
users, ``service.dispatcher.dispatch`` run against the real database, and only Ray played by a
fake that records what it is given (the Ray tests run the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.auth import worker_token
from service.db import make_engine, make_session_factory
from service.dispatcher import dispatch, ray_submission_id
from service.ray_cluster import RayJobs
from tests.conftest import LiveServer, bearer, new_user
from tests.ray_support import free_port


class FakeRayJobs:
    """What the dispatcher uses of ``service.ray_cluster.RayJobs``, recording submissions."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.stopped: list[str] = []

    def submit(self, submission_id: str, entrypoint: str, env_vars: dict[str, str]) -> None:
        assert env_vars["ADVORCH_WORKER_TOKEN"].startswith(submission_id.removeprefix("advorch-"))
        self.submitted.append(submission_id)

    def stop(self, submission_id: str) -> None:
        self.stopped.append(submission_id)

    def dashboard_url(self, submission_id: str) -> str:
        return f"http://ray.invalid/#/jobs/{submission_id}"


@pytest.fixture
def session_factory(fresh_server: LiveServer) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(fresh_server.settings.resolved_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def root(fresh_server: LiveServer) -> Iterator[httpx.Client]:
    """The bootstrap admin of the fresh server."""
    with httpx.Client(base_url=fresh_server.url, headers=bearer(fresh_server.api_token)) as client:
        yield client


def submit(client: httpx.Client, name: str, **spec: Any) -> str:
    response = client.post("/v1/jobs", json={"name": name, **spec})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def finish(server: LiveServer, job_id: str) -> None:
    """The job's workers report it done, through the internal routes with its worker token."""
    headers = bearer(worker_token(server.settings, job_id))
    for status in ("running", "succeeded"):
        response = httpx.post(
            f"{server.url}/v1/internal/jobs/{job_id}/events",
            json={"status": status, "reason": "done"},
            headers=headers,
        )
        assert response.status_code == 200, response.text


def statuses(client: httpx.Client) -> dict[str, str]:
    page = client.get("/v1/jobs", params={"limit": 100}).json()
    return {job["name"]: job["status"] for job in page["items"]}


def test_one_users_burst_does_not_starve_another_users_job(
    fresh_server: LiveServer, root: httpx.Client, session_factory: sessionmaker[Session]
) -> None:
    settings = fresh_server.settings.model_copy(update={"max_running_jobs": 2})
    ray = FakeRayJobs()
    alice, bob = new_user(root, "alice"), new_user(root, "bob")
    burst = [submit(alice.http, f"burst-{i}") for i in range(5)]
    single = submit(bob.http, "single")  # the newest job of all

    dispatch(session_factory, ray, settings)  # type: ignore[arg-type]
    # Alice's oldest, then, with alice on Ray and bob not, bob's: not alice's second.
    assert ray.submitted == [ray_submission_id(burst[0]), ray_submission_id(single)]
    assert bob.http.get(f"/v1/jobs/{single}").json()["status"] == "submitted"
    assert [statuses(alice.http)[f"burst-{i}"] for i in range(5)] == ["submitted"] + 4 * ["queued"]

    dispatch(session_factory, ray, settings)  # type: ignore[arg-type]
    assert len(ray.submitted) == 2, "two jobs are on Ray: the cap is reached"

    finish(fresh_server, burst[0])
    dispatch(session_factory, ray, settings)  # type: ignore[arg-type]
    assert ray.submitted[2:] == [ray_submission_id(burst[1])]
    # A user cancelling frees a place too, and the dispatcher stops it on Ray.
    assert bob.http.post(f"/v1/jobs/{single}/cancel").status_code == 200
    dispatch(session_factory, ray, settings)  # type: ignore[arg-type]
    assert ray.stopped == [ray_submission_id(single)]
    assert ray.submitted[3:] == [ray_submission_id(burst[2])]
    for user in (alice, bob):
        user.http.close()


def test_priority_comes_before_fairness(
    fresh_server: LiveServer, root: httpx.Client, session_factory: sessionmaker[Session]
) -> None:
    settings = fresh_server.settings.model_copy(update={"max_running_jobs": 2})
    ray = FakeRayJobs()
    alice, bob = new_user(root, "alice"), new_user(root, "bob")
    ids = {
        "bob-low": submit(bob.http, "bob-low", priority="low"),
        "alice-1": submit(alice.http, "alice-1"),
        "alice-2": submit(alice.http, "alice-2"),
        "admin-high": submit(root, "admin-high", priority="high"),  # the newest
    }
    names = {ray_submission_id(job_id): name for name, job_id in ids.items()}

    def dispatched() -> list[str]:
        dispatch(session_factory, ray, settings)  # type: ignore[arg-type]
        new = [names[submission_id] for submission_id in ray.submitted[len(seen) :]]
        seen.extend(new)
        return new

    seen: list[str] = []
    # High first, however new; then a normal job, though bob has nothing on Ray.
    assert dispatched() == ["admin-high", "alice-1"]
    finish(fresh_server, ids["admin-high"])
    # Alice has a job on Ray and bob none, but bob's is low: alice's normal one goes first.
    assert dispatched() == ["alice-2"]
    finish(fresh_server, ids["alice-1"])
    assert dispatched() == ["bob-low"]
    for user in (alice, bob):
        user.http.close()


class RefusingRayJobs(FakeRayJobs):
    """Ray answering a submission with a 4xx, as it does for a runtime_env it cannot take."""

    def submit(self, submission_id: str, entrypoint: str, env_vars: dict[str, str]) -> None:
        raise RuntimeError("Request failed with status code 400: runtime_env too large")


def test_a_job_ray_refuses_fails_with_rays_answer_and_the_next_one_goes(
    fresh_server: LiveServer, root: httpx.Client, session_factory: sessionmaker[Session]
) -> None:
    refused, then = submit(root, "refused"), submit(root, "then")
    settings = fresh_server.settings.model_copy(update={"max_running_jobs": 1})

    dispatch(session_factory, RefusingRayJobs(), settings)  # type: ignore[arg-type]
    for job_id in (refused, then):
        job = root.get(f"/v1/jobs/{job_id}").json()
        assert (job["status"], job["error"]) == (
            "failed",
            "Request failed with status code 400: runtime_env too large",
        )
    events = root.get(f"/v1/jobs/{refused}/events").json()
    assert [(e["to_status"], e["reason"]) for e in events] == [
        ("queued", "submitted"),
        ("failed", "Ray refused it"),
    ]


def test_ray_unreachable_leaves_the_jobs_queued_for_the_next_round(
    fresh_server: LiveServer, root: httpx.Client, session_factory: sessionmaker[Session]
) -> None:
    """The real client of Ray's Jobs API, pointed at a port nothing listens on."""
    job_id = submit(root, "waits")
    unreachable = RayJobs(f"http://127.0.0.1:{free_port()}", auth_token=None)

    with pytest.raises(ConnectionError):
        dispatch(session_factory, unreachable, fresh_server.settings)
    assert root.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"

    ray = FakeRayJobs()
    dispatch(session_factory, ray, fresh_server.settings)  # type: ignore[arg-type]
    assert ray.submitted == [ray_submission_id(job_id)]
    assert root.get(f"/v1/jobs/{job_id}").json()["status"] == "submitted"


def test_a_job_cancelled_while_it_is_submitted_is_stopped_on_ray(
    fresh_server: LiveServer, root: httpx.Client, session_factory: sessionmaker[Session]
) -> None:
    job_id = submit(root, "cancelled-meanwhile")

    class CancelledMeanwhile(FakeRayJobs):
        def submit(self, submission_id: str, entrypoint: str, env_vars: dict[str, str]) -> None:
            super().submit(submission_id, entrypoint, env_vars)
            assert root.post(f"/v1/jobs/{job_id}/cancel").status_code == 200

    ray = CancelledMeanwhile()
    dispatch(session_factory, ray, fresh_server.settings)  # type: ignore[arg-type]
    assert ray.submitted == ray.stopped == [ray_submission_id(job_id)]
    assert root.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
