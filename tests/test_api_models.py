"""Model files uploaded for evaluate jobs: streamed, checked, the owner's own, and refused
clearly when they are no model."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import UserClient, checkpoint_bytes


def upload(
    client: httpx.Client, content: bytes, filename: str = "best.pt", **headers: str
) -> httpx.Response:
    return client.post(
        "/v1/models",
        params={"filename": filename},
        content=content,
        headers={"Content-Type": "application/octet-stream", **headers},
    )


def test_an_uploaded_checkpoint_is_kept_and_evaluate_jobs_may_name_it(
    api: httpx.Client, make_user: Callable[..., UserClient]
) -> None:
    content = checkpoint_bytes()
    digest = hashlib.sha256(content).hexdigest()
    response = upload(api, content, **{"X-Content-SHA256": digest})
    assert response.status_code == 201, response.text
    model = response.json()
    assert (model["filename"], model["format"], model["sha256"], model["bytes"]) == (
        "best.pt",
        "advorch",
        digest,
        len(content),
    )
    assert api.get(f"/v1/models/{model['id']}").json() == model
    assert model["id"] in [m["id"] for m in api.get("/v1/models").json()]

    job = {"name": "e", "kind": "evaluate", "source": {"model": model["id"]}}
    assert api.post("/v1/jobs", json=job).status_code == 201
    # Another user neither sees it nor may evaluate it.
    bob = make_user("bob")
    assert bob.http.get(f"/v1/models/{model['id']}").status_code == 404
    assert bob.http.get("/v1/models").json() == []
    refused = bob.http.post("/v1/jobs", json=job)
    assert refused.status_code == 422
    assert refused.json()["error"]["fields"][0]["field"] == "source.model"


def test_a_file_that_is_no_model_or_arrived_damaged_is_refused(api: httpx.Client) -> None:
    before = api.get("/v1/models").json()
    cases: list[tuple[bytes, dict[str, Any], int, str]] = [
        (b"just some text", {}, 422, "not a model file"),
        (checkpoint_bytes(), {"X-Content-SHA256": "0" * 64}, 422, "damaged on the way"),
        (b"", {}, 422, "empty"),
        (b"x" * 2_000_001, {}, 413, "ADVORCH_MAX_UPLOAD_BYTES"),
    ]
    for content, headers, status, message in cases:
        response = upload(api, content, **headers)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]
    assert api.get("/v1/models").json() == before
    bad_name = upload(api, checkpoint_bytes(), filename="../../etc/passwd")
    assert bad_name.status_code == 422
    assert bad_name.json()["error"]["fields"][0]["field"] == "query.filename"
