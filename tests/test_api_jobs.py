"""The user routes over real HTTP, on SQLite and PostgreSQL: submitting, reading, listing with
pagination and filters, cancelling (and its 409s), the audit trail, checkpoints, and docs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from service import jobs
from service.db import make_engine, make_session_factory
from tests.conftest import checkpoint_bytes, upload_checkpoint

if TYPE_CHECKING:
    from tests.conftest import LiveServer

Submit = Callable[..., dict[str, Any]]
Dispatch = Callable[[str], httpx.Client]


def events(api: httpx.Client, job_id: str) -> list[tuple[str | None, str]]:
    response = api.get(f"/v1/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return [(e["from_status"], e["to_status"]) for e in response.json()]


def test_submit_queues_the_job(api: httpx.Client, submit: Submit) -> None:
    job = submit(name="first")
    assert job["status"] == "queued"
    assert job["name"] == "first"
    assert job["num_trials"] == 1
    assert job["progress"] == {"trials_total": 1, "trials_done": 0, "trials_running": 0}
    assert job["best_trial"] is None
    assert job["ray_submission_id"] is None
    assert job["started_at"] is None
    assert api.get(f"/v1/jobs/{job['id']}").json() == job
    assert events(api, job["id"]) == [(None, "queued")]


def test_sweep_stores_its_trial_count(submit: Submit) -> None:
    grid = {
        "training.beta": {"grid": [0.5, 1.0, 3.0, 6.0]},
        "training.epsilon": {"grid": [0.05, 0.1]},
    }
    job = submit(training={"method": "trades"}, sweep={"parameters": grid})
    assert job["num_trials"] == 8
    assert job["progress"]["trials_total"] == 8


def test_unknown_job_is_404_in_the_error_shape(api: httpx.Client) -> None:
    response = api.get("/v1/jobs/no-such-job")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "no job 'no-such-job'", "fields": []}
    }
    assert api.post("/v1/jobs/no-such-job/cancel").status_code == 404


def test_list_pages_through_every_job_newest_first(api: httpx.Client, submit: Submit) -> None:
    mine = [submit(name=f"page-{i}")["id"] for i in range(5)]
    seen: list[str] = []
    offset, total = 0, None
    while total is None or offset < total:
        page = api.get("/v1/jobs", params={"limit": 2, "offset": offset}).json()
        assert len(page["items"]) <= 2
        assert page["limit"] == 2 and page["offset"] == offset
        total = page["total"]
        seen += [job["id"] for job in page["items"]]
        offset += 2
    assert len(seen) == total == len(set(seen))
    assert [job_id for job_id in seen if job_id in mine] == mine[::-1]


def test_list_filters_by_status(api: httpx.Client, submit: Submit) -> None:
    cancelled, queued = submit()["id"], submit()["id"]
    api.post(f"/v1/jobs/{cancelled}/cancel")

    def listed(status: str) -> set[str]:
        page = api.get("/v1/jobs", params={"status": status, "limit": 100}).json()
        assert {job["status"] for job in page["items"]} <= {status}
        return {job["id"] for job in page["items"]}

    assert cancelled in listed("cancelled") and cancelled not in listed("queued")
    assert queued in listed("queued") and queued not in listed("cancelled")


def test_list_refuses_bad_query(api: httpx.Client) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"limit": 0}, "query.limit"),
        ({"limit": 101}, "query.limit"),
        ({"offset": -1}, "query.offset"),
        ({"status": "sleeping"}, "query.status"),
    ]
    for params, field in cases:
        response = api.get("/v1/jobs", params=params)
        assert response.status_code == 422
        assert [f["field"] for f in response.json()["error"]["fields"]] == [field]


def test_an_unknown_query_parameter_or_method_is_refused_clearly(api: httpx.Client) -> None:
    misspelt = api.get("/v1/jobs", params={"stauts": "failed"})
    assert misspelt.status_code == 422
    assert misspelt.json()["error"]["fields"] == [
        {"field": "query.stauts", "message": "unknown query parameter"}
    ]
    wrong_method = api.delete("/v1/jobs")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "GET, POST"  # every method of the path


def test_cancel_a_queued_job_at_once(api: httpx.Client, submit: Submit) -> None:
    job_id = submit()["id"]
    cancelled = api.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] >= cancelled.json()["created_at"]
    assert events(api, job_id) == [(None, "queued"), ("queued", "cancelled")]


def test_cancel_a_finished_job_is_409_and_changes_nothing(
    api: httpx.Client, submit: Submit
) -> None:
    job_id = submit()["id"]
    before = api.post(f"/v1/jobs/{job_id}/cancel").json()
    again = api.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    assert "cancelled" in again.json()["error"]["message"]
    assert api.get(f"/v1/jobs/{job_id}").json() == before
    assert len(events(api, job_id)) == 2


def test_cancel_a_succeeded_job_is_409(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    for status in ("running", "succeeded"):
        posted = worker.post(
            f"/v1/internal/jobs/{job_id}/events", json={"status": status, "reason": "r"}
        )
        assert posted.status_code == 200
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"


def test_cancel_a_job_on_ray_leaves_its_cleanup_to_the_dispatcher(
    api: httpx.Client, submit: Submit, dispatch: Dispatch, live_server: LiveServer
) -> None:
    job_id = submit()["id"]
    dispatch(job_id)
    cancelled = api.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert events(api, job_id)[-2:] == [("queued", "submitted"), ("submitted", "cancelled")]

    # What the dispatcher then sees, and does once it has stopped the Ray job.
    engine = make_engine(live_server.settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        assert job_id in [job.id for job in jobs.jobs_pending_ray_cleanup(session)]
        jobs.mark_ray_cleaned(session, jobs.get_job(session, job_id))
        assert job_id not in [job.id for job in jobs.jobs_pending_ray_cleanup(session)]
    engine.dispose()


def test_the_best_checkpoint_travels_through_the_service(
    api: httpx.Client, submit: Submit, dispatch: Dispatch, live_server: LiveServer
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    trial_url = f"/v1/internal/jobs/{job_id}/trials/trial_0000"
    assert worker.put(trial_url, json={"config": {}, "status": "running"}).status_code == 200
    download = f"/v1/jobs/{job_id}/trials/trial_0000/checkpoint"

    missing = api.get(download)
    assert missing.status_code == 404
    assert "has no checkpoint" in missing.json()["error"]["message"]

    first, second = checkpoint_bytes(seed=1), checkpoint_bytes(seed=2)
    uploaded = upload_checkpoint(worker, job_id, "trial_0000", epoch=1, content=first)
    assert uploaded.status_code == 200
    served = api.get(download)
    assert served.status_code == 200 and served.content == first
    assert served.headers["x-content-sha256"] == hashlib.sha256(first).hexdigest()

    # A new best epoch replaces it, while the trial still runs; the same upload again, or an
    # older epoch's arriving late, changes nothing.
    for epoch, content in [(3, second), (3, second), (2, first)]:
        response = upload_checkpoint(worker, job_id, "trial_0000", epoch=epoch, content=content)
        assert response.status_code == 200, response.text
    assert api.get(download).content == second
    (trial,) = api.get(f"/v1/jobs/{job_id}/trials").json()
    assert trial["status"] == "running"
    assert trial["checkpoint"] == {
        "epoch": 3,
        "sha256": hashlib.sha256(second).hexdigest(),
        "bytes": len(second),
        "url": f"/v1/jobs/{job_id}/trials/trial_0000/checkpoint",
    }
    # The store keeps the one it serves, nothing of the one it replaced.
    stored = list(
        (Path(live_server.settings.resolved_artifacts) / "checkpoints" / job_id).rglob("*")
    )
    assert [p.name for p in stored if p.is_file()] == [f"{hashlib.sha256(second).hexdigest()}.pt"]
    assert api.get(f"/v1/jobs/{job_id}/trials/nope/checkpoint").status_code == 404


@pytest.mark.parametrize(
    ("headers", "content", "status", "message"),
    [
        ({"X-Content-SHA256": "0" * 64}, b"weights", 422, "damaged on the way"),
        ({}, b"weights", 422, "x-content-sha256"),
        (
            {"X-Content-SHA256": hashlib.sha256(b"x" * 2_000_001).hexdigest()},
            b"x" * 2_000_001,
            413,
            "ADVORCH_MAX_UPLOAD_BYTES",
        ),
    ],
    ids=["wrong-checksum", "no-checksum", "too-large"],
)
def test_a_damaged_or_oversized_checkpoint_is_refused_and_changes_nothing(
    api: httpx.Client,
    submit: Submit,
    dispatch: Dispatch,
    headers: dict[str, str],
    content: bytes,
    status: int,
    message: str,
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    assert upload_checkpoint(worker, job_id, "trial_0000", epoch=1).status_code == 200
    before = api.get(f"/v1/jobs/{job_id}/trials/trial_0000/checkpoint").content

    response = worker.put(
        f"/v1/internal/jobs/{job_id}/trials/trial_0000/checkpoint",
        params={"epoch": 2},
        content=content,
        headers=headers,
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert api.get(f"/v1/jobs/{job_id}/trials/trial_0000/checkpoint").content == before
    assert api.get(f"/v1/jobs/{job_id}/trials").json()[0]["checkpoint"]["epoch"] == 1


def test_docs_and_health_need_no_token(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok", "database": "ok"}
        assert anonymous.get("/docs").status_code == 200
        paths = anonymous.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}/tradeoff", "/v1/internal/jobs/{job_id}/events"} <= set(
        paths
    )


def test_a_cancel_wins_over_a_dispatcher_that_read_the_job_before_it(
    api: httpx.Client, submit: Submit, live_server: LiveServer
) -> None:
    job_id = submit()["id"]
    engine = make_engine(live_server.settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        stale = jobs.get_job(session, job_id)  # the dispatcher picks the queued job up...
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # ...a user cancels
        with pytest.raises(jobs.IllegalTransition):
            jobs.mark_submitted(session, stale, ray_submission_id="late", dashboard_url="x")
        assert stale.status == "cancelled"  # reloaded: the dispatcher now knows to stop it
    engine.dispose()
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["ray_submission_id"]) == ("cancelled", None)
    assert events(api, job_id) == [(None, "queued"), ("queued", "cancelled")]
