"""Model files uploaded for evaluate jobs: streamed, checked, the owner's own, and refused
clearly when they are no model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from service.auth import worker_token
from tests.conftest import LiveServer, UserClient, checkpoint_bytes
from workers.evaluation_job import EVALUATION_TRIAL, evaluate_curve
from workers.job_env import JobEnv
from workers.reporter import Reporter
from workers.spec import ARCH_PATH, JobSpec


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


def test_an_evaluate_job_reports_the_architecture_of_the_model_it_attacked(
    live_server: LiveServer,
    api: httpx.Client,
    dispatch: Callable[[str], httpx.Client],
    tmp_path: Path,
) -> None:
    # The evaluate job's own work, without Ray: download the source, attack it, post results.
    model_id = upload(api, checkpoint_bytes()).json()["id"]
    submitted = {
        "name": "evaluate-arch",
        "kind": "evaluate",
        "source": {"model": model_id},
        "evaluation": {"epsilons": [0.1], "attack_steps": 1},
    }
    response = api.post("/v1/jobs", json=submitted)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    dispatch(job_id)
    spec = JobSpec.model_validate(submitted)
    env = JobEnv(
        job_id=job_id,
        service_url=live_server.url,
        worker_token=worker_token(live_server.settings, job_id),
        spec_json=json.dumps(spec.submitted()),
        storage_uri=str(tmp_path / "storage"),
        data_dir=str(tmp_path / "data"),
        node_wait_s=20.0,
    )
    reporter = Reporter.for_job(env)
    try:
        evaluate_curve(spec, env, reporter, {"source": {"model": model_id}})
    finally:
        reporter.close()

    (trial,) = api.get(f"/v1/jobs/{job_id}/trials").json()
    assert (trial["key"], trial["status"]) == (EVALUATION_TRIAL, "succeeded")
    # The uploaded checkpoint's own arch (checkpoint_bytes: a small_cnn), read from its meta.
    assert trial["config"] == {"source": {"model": model_id}, ARCH_PATH: "small_cnn"}
