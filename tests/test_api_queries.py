"""How many SQL statements a request costs, counted on the live server's own engine (it runs in
this process): the same whatever the number of trials a job has, or of jobs a page lists (no
N+1), and a metrics post is one upsert, not a read then a write."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event

from api.schemas import JobPage
from service.db import make_engine, make_session_factory
from service.models import ApiToken, utcnow
from tests.conftest import LiveServer, UserClient, bearer, new_user, serve, server_settings

SPEC: dict[str, Any] = {
    "name": "queries",
    "dataset": {"name": "digits"},
    "model": {"arch": "small_cnn"},
    "training": {"method": "trades", "epochs": 3},
    "sweep": {"parameters": {"training.beta": {"grid": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}}},
}


@contextmanager
def statements_of(server: LiveServer) -> Iterator[list[str]]:
    """The SQL statements run on ``server``'s database while the block runs (by the server's
    threads: the test's own engine, if any, is another database URL's or is not used then)."""
    url = server.settings.resolved_database_url
    seen: list[str] = []
    lock = threading.Lock()

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if conn.engine.url.render_as_string(hide_password=False) == url:
            with lock:
                seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def post_trial(worker: httpx.Client, job_id: str, n: int) -> None:
    base = f"/v1/internal/jobs/{job_id}/trials/trial_{n:04d}"
    for epoch in (1, 2):
        metrics = {"epoch": epoch, "val_clean_acc": 0.5, "val_robust_acc": 0.2 + n / 100}
        assert worker.post(f"{base}/metrics", json=metrics).status_code == 200
    final = {"config": {"training.beta": float(n + 1)}, "status": "succeeded", "clean_acc": 0.8}
    final |= {"robust_acc": 0.4, "best_epoch": 2, "val_clean_acc": 0.7, "val_robust_acc": 0.3}
    assert worker.put(base, json=final).status_code == 200


def count(server: LiveServer, request: Callable[[], httpx.Response]) -> int:
    """The statements of ``request()``, less the token's lookup: that one is cached for a
    second (the last test of this file), and whether a request falls on a refresh is timing."""
    with statements_of(server) as seen:
        assert request().status_code == 200
    return len([statement for statement in seen if "api_tokens" not in statement])


@pytest.fixture
def user(make_user: Callable[..., UserClient]) -> UserClient:
    """A user of their own: the list route lists their jobs only, however many the session's
    other tests make."""
    return make_user("queries")


def test_a_job_is_read_in_one_query_however_many_trials(
    live_server: LiveServer, user: UserClient, worker: Callable[[str], httpx.Client]
) -> None:
    """The first read after a change: the stamp, then the job with its trials and owner (one
    SELECT with joins); the reads after it: the stamp alone (api.response_cache)."""
    job_id = user.http.post("/v1/jobs", json=SPEC).json()["id"]
    posts = worker(job_id)
    read = lambda: user.http.get(f"/v1/jobs/{job_id}")  # noqa: E731

    post_trial(posts, job_id, 0)
    with_one = count(live_server, read), count(live_server, read)
    for n in range(1, 6):
        post_trial(posts, job_id, n)
    with_six = count(live_server, read), count(live_server, read)

    assert user.http.get(f"/v1/jobs/{job_id}").json()["progress"]["trials_done"] == 6
    assert with_one == with_six == (2, 1)


def test_a_cached_job_page_is_never_served_once_the_job_or_a_trial_changed(
    user: UserClient,
    worker: Callable[[str], httpx.Client],
    make_user: Callable[..., UserClient],
) -> None:
    job_id = user.http.post("/v1/jobs", json=SPEC).json()["id"]
    posts = worker(job_id)
    base = f"/v1/internal/jobs/{job_id}"
    read = lambda: user.http.get(f"/v1/jobs/{job_id}").json()  # noqa: E731
    post_trial(posts, job_id, 0)
    assert read() == read()  # kept, and served again

    # A trial's change (a new best on validation) shows at once...
    better = {"config": {"training.beta": 1.0}, "val_robust_acc": 0.9}
    assert posts.put(f"{base}/trials/trial_0000", json=better).status_code == 200
    assert read()["best_trial"]["val_robust_acc"] == 0.9
    # ...and so do a new trial and the job's own change.
    post_trial(posts, job_id, 1)
    assert read()["progress"]["trials_done"] == 2
    failed = posts.post(f"{base}/events", json={"status": "failed", "reason": "x"})
    assert failed.status_code == 200
    assert read()["status"] == "failed"
    # Another user's job stays a 404, cached or not.
    assert make_user("other").http.get(f"/v1/jobs/{job_id}").status_code == 404


def test_the_job_list_costs_the_same_for_one_job_or_twenty(
    live_server: LiveServer, user: UserClient, worker: Callable[[str], httpx.Client]
) -> None:
    def submit_with_trials() -> None:
        job_id = user.http.post("/v1/jobs", json=SPEC).json()["id"]
        post_trial(worker(job_id), job_id, 0)
        post_trial(worker(job_id), job_id, 1)

    read = lambda: user.http.get("/v1/jobs", params={"limit": 20})  # noqa: E731
    submit_with_trials()
    one = count(live_server, read), count(live_server, read)
    for _ in range(19):
        submit_with_trials()
    twenty = count(live_server, read), count(live_server, read)

    page = JobPage.model_validate_json(read().content)
    assert len(page.items) == 20 and page.total == 20 and page.items[0].num_trials == 6
    assert all(job.progress.trials_done == 2 for job in page.items)
    # The count and the page's stamps; then, for jobs changed since they were last read
    # (api.response_cache), those jobs with their owners, and their trials.
    assert one == twenty == (4, 2)


def test_a_metrics_post_is_one_upsert(
    live_server: LiveServer, user: UserClient, worker: Callable[[str], httpx.Client]
) -> None:
    job_id = user.http.post("/v1/jobs", json=SPEC).json()["id"]
    posts = worker(job_id)
    post_trial(posts, job_id, 0)  # the trial exists and runs
    url = f"/v1/internal/jobs/{job_id}/trials/trial_0000/metrics"

    # (worker tokens are checked without the database)
    with statements_of(live_server) as seen:
        assert posts.post(url, json={"epoch": 3, "train_loss": 0.5}).status_code == 200
    with statements_of(live_server) as again:  # the same epoch again: merged, not refused
        response = posts.post(url, json={"epoch": 3, "lr": 0.01})
    assert response.status_code == 200
    assert response.json() | {"epoch": 3} == response.json()
    assert response.json()["train_loss"] == 0.5 and response.json()["lr"] == 0.01

    writes = [s for s in seen if s.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert len(writes) == 1 and "ON CONFLICT" in writes[0].upper(), seen
    # The job, the trial, the upsert.
    assert len(seen) == len(again) == 3, seen


def test_a_revoked_token_is_refused_once_the_cache_has_expired(
    make_database_url: Callable[[str], str], tmp_path: Path
) -> None:
    """A revocation made elsewhere (another API process, straight in the database) counts
    within ADVORCH_TOKEN_CACHE_S; until then the token is trusted from the cache."""
    ttl_s = 2.0
    settings = server_settings(tmp_path, make_database_url("sqlite"), token_cache_s=ttl_s)
    with serve(settings) as server, httpx.Client(base_url=server.url) as http:
        alice = new_user(httpx.Client(base_url=server.url, headers=bearer(server.api_token)), "a")
        cached_at = time.monotonic()
        assert alice.http.get("/v1/me").status_code == 200  # looked up, and cached
        engine = make_engine(settings.resolved_database_url)
        with make_session_factory(engine)() as session:
            token = session.get(ApiToken, alice.token_id)
            assert token is not None
            token.revoked_at = utcnow()
            session.commit()
        engine.dispose()

        still_trusted = alice.http.get("/v1/me").status_code
        if time.monotonic() - cached_at < ttl_s - 0.2:  # a slow machine may be past it
            assert still_trusted == 200
        time.sleep(max(0.0, cached_at + ttl_s + 0.1 - time.monotonic()))
        assert http.get("/v1/me", headers=bearer(alice.token)).status_code == 401
