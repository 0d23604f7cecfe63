"""Many users on one service, over real HTTP on SQLite and PostgreSQL: accounts and tokens
(shown once, stored hashed, revocable), who may see which job (another user's is a 404 on every
job route), admin-only routes, per-user limits (429 naming the limit), priority, and the audit
trail."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import MetaData, select

from service.db import make_engine, make_session_factory, upgrade_database
from service.settings import Settings
from service.users import authenticate, ensure_bootstrap_admin, revoke_token
from tests.conftest import (
    BACKENDS,
    UserClient,
    bearer,
    new_user,
    play_workers,
    serve,
    server_settings,
)

if TYPE_CHECKING:
    from tests.conftest import LiveServer

MakeUser = Callable[..., UserClient]
Dispatch = Callable[[str], httpx.Client]


def submit_as(user: httpx.Client, **spec: Any) -> dict[str, Any]:
    response = user.post("/v1/jobs", json={"name": "users-test-job", **spec})
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def job_routes(job_id: str, trial_key: str) -> list[tuple[str, str]]:
    """Every user route that names a job, as (method, path)."""
    base = f"/v1/jobs/{job_id}"
    return [
        ("GET", base),
        ("GET", f"{base}/events"),
        ("GET", f"{base}/trials"),
        ("GET", f"{base}/trials/{trial_key}/metrics"),
        ("GET", f"{base}/trials/{trial_key}/checkpoint"),
        ("GET", f"{base}/tradeoff"),
        ("GET", f"{base}/curve"),
        ("GET", f"{base}/logs"),
        ("POST", f"{base}/cancel"),  # last: the owner's check leaves it out
    ]


def error_message(response: httpx.Response) -> str:
    return str(response.json()["error"]["message"])


# --- who a token belongs to ---


def test_the_bootstrap_admin_is_the_servers_own_token(api: httpx.Client) -> None:
    me = api.get("/v1/me").json()
    assert (me["name"], me["admin"], me["token_id"]) == ("admin", True, "bootstrap")


def test_a_new_user_gets_a_token_shown_once(api: httpx.Client, make_user: MakeUser) -> None:
    alice = make_user("alice")
    assert alice.token.startswith(f"adv_{alice.token_id}_") and len(alice.token) >= 4 + 12 + 43
    me = alice.http.get("/v1/me")
    assert me.status_code == 200
    assert (me.json()["name"], me.json()["admin"], me.json()["token_id"]) == (
        alice.name,
        False,
        alice.token_id,
    )
    # Listed by its id, never shown again.
    listed = api.get(f"/v1/users/{alice.name}").json()
    assert [token["id"] for token in listed["tokens"]] == [alice.token_id]
    assert alice.token not in api.get("/v1/users").text
    assert alice.token not in api.get("/v1/audit", params={"limit": 100}).text


def test_user_names_are_checked_and_unique(api: httpx.Client, make_user: MakeUser) -> None:
    alice = make_user("alice")
    taken = api.post("/v1/users", json={"name": alice.name})
    assert taken.status_code == 409 and "exists already" in error_message(taken)
    assert api.post("/v1/users", json={"name": "admin"}).status_code == 409
    for bad in ["", "has space", "-dash-first", "x" * 65, "slash/name"]:
        response = api.post("/v1/users", json={"name": bad})
        assert response.status_code == 422, bad
        assert [f["field"] for f in response.json()["error"]["fields"]] == ["name"]
    assert api.post("/v1/users", json={"name": "ok", "role": "x"}).status_code == 422
    assert api.get("/v1/users/no-such-user").status_code == 404


def test_several_tokens_each_revocable_at_once(api: httpx.Client, make_user: MakeUser) -> None:
    alice = make_user("alice")
    second = api.post(f"/v1/users/{alice.name}/tokens")
    assert second.status_code == 201
    second_token, second_id = second.json()["token"], second.json()["id"]
    assert second_id != alice.token_id
    assert api.get("/v1/me", headers=bearer(second_token)).status_code == 200

    revoked = api.delete(f"/v1/users/{alice.name}/tokens/{alice.token_id}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = alice.http.get("/v1/jobs")
    assert refused.status_code == 401  # the very next request
    assert refused.json()["error"]["code"] == "unauthorized"
    still = api.get("/v1/me", headers=bearer(second_token))
    assert still.status_code == 200 and still.json()["token_id"] == second_id

    # Revoking again changes nothing; someone else's or an unknown token id is a 404.
    again = api.delete(f"/v1/users/{alice.name}/tokens/{alice.token_id}")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    bob = make_user("bob")
    assert api.delete(f"/v1/users/{alice.name}/tokens/{bob.token_id}").status_code == 404
    assert bob.http.get("/v1/me").status_code == 200
    tokens = {t["id"]: t for t in api.get(f"/v1/users/{alice.name}").json()["tokens"]}
    assert tokens[alice.token_id]["revoked_at"] is not None
    assert tokens[second_id]["revoked_at"] is None


def test_a_disabled_user_gets_401_at_once_and_their_jobs_stay(
    api: httpx.Client, make_user: MakeUser, dispatch: Dispatch
) -> None:
    alice = make_user("alice")
    second_token = api.post(f"/v1/users/{alice.name}/tokens").json()["token"]
    job_id = submit_as(alice.http, name="before-disable")["id"]
    play_workers(dispatch(job_id), job_id, {"trial_0000": (0.0, 0.9, 0.5)})
    before = api.get(f"/v1/jobs/{job_id}").json()

    disabled = api.delete(f"/v1/users/{alice.name}")
    assert disabled.status_code == 200 and disabled.json()["disabled_at"] is not None
    for token in (alice.token, second_token):
        assert api.get("/v1/jobs", headers=bearer(token)).status_code == 401

    # The jobs and their results stay, for an admin to read.
    assert api.get(f"/v1/jobs/{job_id}").json() == before
    assert before["owner"] == alice.name and before["status"] == "succeeded"
    assert api.get(f"/v1/jobs/{job_id}/trials").json()[0]["robust_acc"] == 0.5
    listed = api.get("/v1/jobs", params={"owner": alice.name}).json()
    assert [job["id"] for job in listed["items"]] == [job_id]
    # A disabled user gets no new token; disabling again changes nothing.
    assert api.post(f"/v1/users/{alice.name}/tokens").status_code == 409
    assert api.delete(f"/v1/users/{alice.name}").json() == disabled.json()


def test_the_last_enabled_admin_cannot_be_disabled(fresh_server: LiveServer) -> None:
    with httpx.Client(base_url=fresh_server.url, headers=bearer(fresh_server.api_token)) as root:
        refused = root.delete("/v1/users/admin")
        assert refused.status_code == 409 and "last enabled admin" in error_message(refused)
        ops = new_user(root, "ops", admin=True)
        assert ops.http.delete("/v1/users/admin").status_code == 200  # ops is an admin still
        assert root.get("/v1/me").status_code == 401
        assert ops.http.delete(f"/v1/users/{ops.name}").status_code == 409
        ops.http.close()


def test_admin_routes_are_403_for_users(
    api: httpx.Client, make_user: MakeUser, live_server: LiveServer
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    users_before = api.get("/v1/users").json()
    for method, path, body in [
        ("POST", "/v1/users", {"name": "mallory", "admin": True}),
        ("GET", "/v1/users", None),
        ("GET", f"/v1/users/{bob.name}", None),
        ("PATCH", f"/v1/users/{alice.name}", {"max_active_jobs": 1000}),
        ("DELETE", f"/v1/users/{bob.name}", None),
        ("POST", f"/v1/users/{bob.name}/tokens", None),
        ("DELETE", f"/v1/users/{bob.name}/tokens/{bob.token_id}", None),
        ("GET", "/v1/audit", None),
    ]:
        response = alice.http.request(method, path, json=body)
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "forbidden"
    assert api.get("/v1/users").json() == users_before
    assert bob.http.get("/v1/me").status_code == 200
    # Listing another user's jobs is an admin's filter too.
    assert alice.http.get("/v1/jobs", params={"owner": bob.name}).status_code == 403
    assert alice.http.get("/v1/jobs", params={"owner": alice.name}).status_code == 200


# --- ownership ---


def test_users_see_and_act_on_their_own_jobs_only(
    api: httpx.Client, make_user: MakeUser, dispatch: Dispatch
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    alices = submit_as(alice.http, name="alices-sweep")["id"]
    play_workers(dispatch(alices), alices, {"trial_0000": (0.0, 0.9, 0.5)}, checkpoints=True)
    alices_queued = submit_as(alice.http, name="alices-queued")["id"]
    bobs = submit_as(bob.http, name="bobs-job")["id"]

    for job_id in (alices, alices_queued):
        for method, path in job_routes(job_id, "trial_0000"):
            response = bob.http.request(method, path)
            assert response.status_code == 404, (method, path)
            # Exactly what a job that does not exist answers: ids cannot be probed.
            unknown = bob.http.request(method, path.replace(job_id, "0" * 32))
            assert error_message(response) == error_message(unknown).replace("0" * 32, job_id)
    # Alice reaches each of them (logs: this server has no Ray cluster, which it says).
    for method, path in job_routes(alices, "trial_0000")[:-1]:
        assert alice.http.request(method, path).status_code == (503 if "logs" in path else 200)
    # Bob's cancels changed nothing.
    assert alice.http.get(f"/v1/jobs/{alices_queued}").json()["status"] == "queued"
    assert len(alice.http.get(f"/v1/jobs/{alices_queued}/events").json()) == 1

    def listed(client: httpx.Client, **params: Any) -> set[str]:
        page = client.get("/v1/jobs", params={"limit": 100, **params}).json()
        return {job["id"] for job in page["items"]}

    assert listed(alice.http) == {alices, alices_queued}
    assert listed(bob.http) == {bobs}
    assert alice.http.get("/v1/jobs").json()["total"] == 2
    # Admins see everything, and filter by owner.
    assert {alices, alices_queued, bobs} <= listed(api)
    assert listed(api, owner=alice.name) == {alices, alices_queued}
    assert api.get(f"/v1/jobs/{bobs}").json()["owner"] == bob.name
    assert api.get("/v1/jobs", params={"owner": "no-such-user"}).status_code == 404
    # An admin may cancel anyone's job; the job's events say who did.
    assert api.post(f"/v1/jobs/{bobs}/cancel").json()["status"] == "cancelled"
    assert bob.http.get(f"/v1/jobs/{bobs}/events").json()[-1]["reason"] == "cancelled by admin"


# --- limits and priority ---


def test_over_a_users_limits_is_429_naming_the_limit(
    api: httpx.Client, make_user: MakeUser, live_server: LiveServer
) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    settings = live_server.settings
    me = alice.http.get("/v1/me").json()
    assert me["limits"] == {
        "max_active_jobs": settings.user_max_active_jobs,
        "max_trials_per_job": settings.user_max_trials_per_job,
    }
    patched = api.patch(
        f"/v1/users/{alice.name}", json={"max_active_jobs": 2, "max_trials_per_job": 2}
    )
    assert patched.status_code == 200
    assert patched.json()["limits"] == {"max_active_jobs": 2, "max_trials_per_job": 2}

    first, _ = submit_as(alice.http)["id"], submit_as(alice.http)["id"]
    third = alice.http.post("/v1/jobs", json={"name": "one-too-many"})
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "quota_exceeded"
    assert "max_active_jobs" in error_message(third) and "at most 2" in error_message(third)
    assert alice.http.get("/v1/jobs").json()["total"] == 2  # nothing was queued
    submit_as(bob.http)  # bob's own limits are not alice's

    # A finished job frees its place.
    alice.http.post(f"/v1/jobs/{first}/cancel")
    submit_as(alice.http)

    sweep = {"parameters": {"training.epsilon": {"grid": [0.01, 0.02, 0.03]}}}
    too_many_trials = alice.http.post("/v1/jobs", json={"name": "big", "sweep": sweep})
    assert too_many_trials.status_code == 429
    assert "max_trials_per_job" in error_message(too_many_trials)
    assert "3 trials" in error_message(too_many_trials)

    # null gives the server's setting back.
    cleared = api.patch(f"/v1/users/{alice.name}", json={"max_active_jobs": None})
    assert cleared.json()["limit_overrides"] == {"max_active_jobs": None, "max_trials_per_job": 2}
    assert cleared.json()["limits"]["max_active_jobs"] == settings.user_max_active_jobs
    assert api.patch(f"/v1/users/{alice.name}", json={"max_active_jobs": -1}).status_code == 422


def test_submissions_at_once_cannot_both_take_the_last_place(
    api: httpx.Client, make_user: MakeUser
) -> None:
    alice = make_user("alice")
    api.patch(f"/v1/users/{alice.name}", json={"max_active_jobs": 1})
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(lambda i: alice.http.post("/v1/jobs", json={"name": f"race-{i}"}), range(8))
        )
    assert sorted(answer.status_code for answer in answers) == [201] + [429] * 7
    assert alice.http.get("/v1/jobs").json()["total"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_servers_limit_applies_without_an_override(
    backend: str, make_database_url: Callable[[str], str], tmp_path: Path
) -> None:
    settings = server_settings(tmp_path, make_database_url(backend), user_max_active_jobs=1)
    with (
        serve(settings) as server,
        httpx.Client(base_url=server.url, headers=bearer(server.api_token)) as root,
    ):
        alice = new_user(root, "alice")
        submit_as(alice.http)
        refused = alice.http.post("/v1/jobs", json={"name": "second"})
        assert refused.status_code == 429
        assert "max_active_jobs" in error_message(refused)
        assert "ADVORCH_USER_MAX_ACTIVE_JOBS" in error_message(refused)
        alice.http.close()


def test_only_admins_may_ask_for_high_priority(api: httpx.Client, make_user: MakeUser) -> None:
    alice = make_user("alice")
    refused = alice.http.post("/v1/jobs", json={"name": "urgent", "priority": "high"})
    assert refused.status_code == 403
    assert "priority" in error_message(refused)
    assert alice.http.get("/v1/jobs").json()["total"] == 0
    assert submit_as(alice.http, priority="low")["spec"]["priority"] == "low"
    assert submit_as(alice.http)["spec"]["priority"] == "normal"
    assert submit_as(api, priority="high")["spec"]["priority"] == "high"
    invalid = alice.http.post("/v1/jobs", json={"name": "x", "priority": "urgent"})
    assert invalid.status_code == 422
    assert [f["field"] for f in invalid.json()["error"]["fields"]] == ["priority"]


# --- the audit trail ---


def test_the_audit_trail_says_who_did_what(
    api: httpx.Client, make_user: MakeUser, dispatch: Dispatch
) -> None:
    alice = make_user("alice")
    token_id = api.post(f"/v1/users/{alice.name}/tokens").json()["id"]
    api.delete(f"/v1/users/{alice.name}/tokens/{token_id}")
    api.patch(f"/v1/users/{alice.name}", json={"max_trials_per_job": 4})
    cancelled = submit_as(alice.http)["id"]
    alice.http.post(f"/v1/jobs/{cancelled}/cancel")
    ran = submit_as(alice.http)["id"]
    play_workers(dispatch(ran), ran, {"trial_0000": (0.0, 0.9, 0.5)})
    api.delete(f"/v1/users/{alice.name}")

    def trail(**params: Any) -> list[tuple[str, str, str, str]]:
        page = api.get("/v1/audit", params={"limit": 100, **params}).json()
        return [(e["actor_kind"], e["actor"], e["action"], e["target"]) for e in page["items"]]

    alices_things = {alice.name, alice.token_id, token_id}
    admin_did = [event for event in trail(actor="admin") if event[3] in alices_things]
    assert admin_did[::-1] == [
        ("user", "admin", "user.create", alice.name),
        ("user", "admin", "token.issue", alice.token_id),
        ("user", "admin", "token.issue", token_id),
        ("user", "admin", "token.revoke", token_id),
        ("user", "admin", "user.limits", alice.name),
        ("user", "admin", "user.disable", alice.name),
    ]
    assert trail(actor=alice.name)[::-1] == [
        ("user", alice.name, "job.submit", cancelled),
        ("user", alice.name, "job.cancel", cancelled),
        ("user", alice.name, "job.submit", ran),
    ]
    assert trail(actor=ran) == [("worker", ran, "job.report", ran)] * 2  # running, succeeded
    reports = api.get("/v1/audit", params={"actor": ran}).json()["items"]
    assert "running -> succeeded" in reports[0]["detail"]
    assert trail(action="user.disable")[0] == ("user", "admin", "user.disable", alice.name)


def test_the_audit_trail_is_paginated_newest_first(api: httpx.Client, make_user: MakeUser) -> None:
    for _ in range(3):
        make_user("paged")
    total = api.get("/v1/audit", params={"limit": 1}).json()["total"]
    seen: list[int] = []
    for offset in range(0, total, 7):
        page = api.get("/v1/audit", params={"limit": 7, "offset": offset}).json()
        assert page["total"] == total and page["limit"] == 7 and page["offset"] == offset
        seen += [event["id"] for event in page["items"]]
    assert seen == sorted(seen, reverse=True) and len(seen) == total == len(set(seen))
    assert api.get("/v1/audit", params={"limit": 101}).status_code == 422
    assert api.get("/v1/audit", params={"action": "user.dance"}).status_code == 422


# --- tokens at rest ---


def test_tokens_are_not_stored_in_clear(
    api: httpx.Client, make_user: MakeUser, live_server: LiveServer
) -> None:
    alice = make_user("alice")
    second = api.post(f"/v1/users/{alice.name}/tokens").json()["token"]
    tokens = [alice.token, second, live_server.api_token]
    # adv_<id>_<secret>; the bootstrap token is whatever was configured, all secret.
    secrets = [token.split("_", 2)[-1] if token.startswith("adv_") else token for token in tokens]

    engine = make_engine(live_server.settings.resolved_database_url)
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        rows = [
            row for table in metadata.sorted_tables for row in connection.execute(select(table))
        ]
        everything = " ".join(repr(tuple(row)) for row in rows)
        hashes = set(connection.scalars(select(metadata.tables["api_tokens"].c.token_hash)))
    engine.dispose()
    for token, secret in zip(tokens, secrets, strict=True):
        assert token not in everything and secret not in everything
        assert hashlib.sha256(token.encode()).hexdigest() in hashes


def test_the_bootstrap_token_follows_the_configured_one(tmp_path: Path) -> None:
    """A revoked bootstrap token stays revoked over restarts until another is configured."""
    settings = Settings(home=tmp_path)
    upgrade_database(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with make_session_factory(engine)() as session:
        admin = ensure_bootstrap_admin(session, "first-token")
        found = authenticate(session, "first-token")
        assert found is not None and found.user.name == "admin" and found.id == "bootstrap"
        revoke_token(session, "admin", "bootstrap", by=admin)
        assert authenticate(session, "first-token") is None
        ensure_bootstrap_admin(session, "first-token")  # a restart with the same token
        assert authenticate(session, "first-token") is None
        ensure_bootstrap_admin(session, "second-token")  # a new one configured
        assert authenticate(session, "second-token") is not None
        assert authenticate(session, "first-token") is None
    engine.dispose()


@pytest.mark.parametrize("token", ["not-a-token", "adv_", "adv_0123456789ab_", "x" * 5000])
def test_malformed_tokens_are_401(live_server: LiveServer, token: str) -> None:
    response = httpx.get(f"{live_server.url}/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
