"""The routes workers post to, over real HTTP on SQLite and PostgreSQL: a job's whole life,
read back by the user routes; idempotency and order independence; and the 409s."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import upload_checkpoint

Submit = Callable[..., dict[str, Any]]
Dispatch = Callable[[str], httpx.Client]

TRADES_SWEEP: dict[str, Any] = {
    "training": {"method": "trades", "epochs": 2},
    "sweep": {"parameters": {"training.beta": {"grid": [1.0, 6.0]}}},
}


def post_event(worker: httpx.Client, job_id: str, status: str, **body: Any) -> httpx.Response:
    return worker.post(
        f"/v1/internal/jobs/{job_id}/events", json={"status": status, "reason": "r", **body}
    )


def put_trial(worker: httpx.Client, job_id: str, key: str, **body: Any) -> httpx.Response:
    response = worker.put(f"/v1/internal/jobs/{job_id}/trials/{key}", json={"config": {}, **body})
    assert response.status_code == 200, response.text
    return response


def post_metrics(worker: httpx.Client, job_id: str, key: str, **metrics: Any) -> httpx.Response:
    response = worker.post(f"/v1/internal/jobs/{job_id}/trials/{key}/metrics", json=metrics)
    assert response.status_code == 200, response.text
    return response


def without_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.endswith("_at")} for row in rows]


def test_the_life_of_a_job(api: httpx.Client, submit: Submit, dispatch: Dispatch) -> None:
    job_id = submit(name="life", **TRADES_SWEEP)["id"]
    worker = dispatch(job_id)
    assert post_event(worker, job_id, "running", reason="workers started").status_code == 200

    results = {"trial_0000": (1.0, 0.90, 0.40), "trial_0001": (6.0, 0.80, 0.50)}
    for key, (beta, clean, robust) in results.items():
        put_trial(worker, job_id, key, config={"training.beta": beta}, status="running")
        for epoch in (1, 2):
            post_metrics(
                worker,
                job_id,
                key,
                epoch=epoch,
                train_loss=1.0 / epoch,
                train_acc=0.5,
                val_clean_acc=clean,
                val_robust_acc=robust,
                lr=0.1,
                epoch_seconds=2.0,
                images_per_second=900.0,
            )
        mid_sweep = api.get(f"/v1/jobs/{job_id}").json()["progress"]
        assert mid_sweep["trials_running"] == 1
        put_trial(
            worker,
            job_id,
            key,
            config={"training.beta": beta},
            status="succeeded",
            clean_acc=clean,
            robust_acc=robust,
            best_epoch=2,
            val_clean_acc=clean,
            val_robust_acc=robust,
        )
    done = post_event(worker, job_id, "succeeded", reason="all trials finished")
    assert done.status_code == 200
    assert done.json()["status"] == "succeeded"

    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["started_at"] is not None and job["finished_at"] >= job["started_at"]
    assert job["ray_submission_id"] == f"advorch-{job_id}"
    assert job["dashboard_url"].endswith(job["ray_submission_id"])
    assert job["progress"] == {"trials_total": 2, "trials_done": 2, "trials_running": 0}
    assert job["best_trial"] == {
        "key": "trial_0001",
        "config": {"training.beta": 6.0},
        "chosen_by": "val_robust_acc",
        "val_clean_acc": 0.80,
        "val_robust_acc": 0.50,
        "clean_acc": 0.80,
        "robust_acc": 0.50,
        "autoattack_acc": None,
    }

    trials = api.get(f"/v1/jobs/{job_id}/trials").json()
    assert [(t["key"], t["status"], t["best_epoch"]) for t in trials] == [
        ("trial_0000", "succeeded", 2),
        ("trial_0001", "succeeded", 2),
    ]
    metrics = api.get(f"/v1/jobs/{job_id}/trials/trial_0001/metrics").json()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["train_loss"] == 0.5 and metrics[1]["val_robust_acc"] == 0.50

    tradeoff = api.get(f"/v1/jobs/{job_id}/tradeoff").json()
    assert tradeoff["robust_axis"] == {
        "metric": "robust_acc",
        "attack": "PGD-20",
        "epsilon": 8 / 255,
    }
    assert [(p["trials"], p["on_front"]) for p in tradeoff["points"]] == [
        (["trial_0001"], True),
        (["trial_0000"], True),
    ]
    assert [p["trials"] for p in tradeoff["front"]] == [["trial_0001"], ["trial_0000"]]

    trail = api.get(f"/v1/jobs/{job_id}/events").json()
    assert [(e["to_status"], e["reason"]) for e in trail] == [
        ("queued", "submitted"),
        ("submitted", "submitted to Ray"),
        ("running", "workers started"),
        ("succeeded", "all trials finished"),
    ]


def test_tradeoff_front_leaves_out_dominated_trials(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    betas = [0.0, 1.0, 2.0, 3.0, 4.0]
    job_id = submit(
        training={"method": "trades"}, sweep={"parameters": {"training.beta": {"grid": betas}}}
    )["id"]
    worker = dispatch(job_id)
    scores = [(0.9, 0.3), (0.8, 0.5), (0.7, 0.4), (0.8, 0.5), (0.6, None)]
    for number, (beta, (clean, robust)) in enumerate(zip(betas, scores, strict=True)):
        put_trial(worker, job_id, f"trial_{number:04d}", config={"training.beta": beta},
                  status="succeeded", clean_acc=clean, robust_acc=robust)  # fmt: skip
    tradeoff = api.get(f"/v1/jobs/{job_id}/tradeoff").json()
    on_front = {p["trials"][0]: p["on_front"] for p in tradeoff["points"]}
    # trial_0002 is dominated; trial_0004 has no robust accuracy.
    assert on_front == {"trial_0000": True, "trial_0001": True, "trial_0002": False,
                        "trial_0003": True}  # fmt: skip
    assert [p["clean_acc"] for p in tradeoff["front"]] == [0.8, 0.8, 0.9]


def test_the_best_trial_is_chosen_on_validation_even_where_test_disagrees(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    job_id = submit(
        training={"method": "trades"},
        sweep={"parameters": {"training.beta": {"grid": [1.0, 6.0, 9.0]}}},
    )["id"]
    worker = dispatch(job_id)
    # beta 1 looks better on test, beta 6 on validation: validation decides.
    put_trial(worker, job_id, "trial_0000", config={"training.beta": 1.0}, status="succeeded",
              clean_acc=0.9, robust_acc=0.7, val_clean_acc=0.9, val_robust_acc=0.4)  # fmt: skip
    put_trial(worker, job_id, "trial_0001", config={"training.beta": 6.0}, status="succeeded",
              clean_acc=0.8, robust_acc=0.5, val_clean_acc=0.8, val_robust_acc=0.6)  # fmt: skip
    # A running trial with a high validation score is no candidate until it has succeeded.
    put_trial(worker, job_id, "trial_0002", config={"training.beta": 9.0}, status="running",
              val_robust_acc=0.9)  # fmt: skip
    best = api.get(f"/v1/jobs/{job_id}").json()["best_trial"]
    assert (best["key"], best["chosen_by"], best["robust_acc"]) == (
        "trial_0001",
        "val_robust_acc",
        0.5,
    )


def test_repeats_are_grouped_as_mean_and_std_and_autoattack_is_the_robust_axis(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    sweep = {"parameters": {"training.beta": {"grid": [1.0, 6.0]}}, "num_samples": 2}
    job = submit(
        training={"method": "trades", "epochs": 1},
        evaluation={"autoattack": True, "epsilon": 0.1},
        sweep=sweep,
    )
    assert job["num_trials"] == 4
    worker = dispatch(job["id"])
    results = {  # key: (beta, seed, clean, PGD, AutoAttack)
        "trial_0000": (1.0, 0, 0.90, 0.60, 0.50),
        "trial_0001": (1.0, 1, 0.80, 0.50, 0.40),
        "trial_0002": (6.0, 0, 0.70, 0.60, 0.55),
        "trial_0003": (6.0, 1, 0.70, 0.60, None),  # its AutoAttack has not finished
    }
    for key, (beta, seed, clean, pgd, autoattack) in results.items():
        config = {"training.beta": beta, "training.seed": seed}
        put_trial(worker, job["id"], key, config=config, status="succeeded", clean_acc=clean,
                  robust_acc=pgd, autoattack_acc=autoattack)  # fmt: skip

    tradeoff = api.get(f"/v1/jobs/{job['id']}/tradeoff").json()
    assert tradeoff["robust_axis"] == {
        "metric": "autoattack_acc",
        "attack": "AutoAttack (standard)",
        "epsilon": 0.1,
    }
    points = {p["config"]["training.beta"]: p for p in tradeoff["points"]}
    assert points[1.0]["trials"] == ["trial_0000", "trial_0001"]
    assert points[1.0]["clean_acc"] == pytest.approx(0.85)
    assert points[1.0]["robust_acc"] == pytest.approx(0.45)
    assert points[1.0]["clean_acc_std"] == pytest.approx(0.0707107)
    assert points[1.0]["robust_acc_std"] == pytest.approx(0.0707107)
    assert points[1.0]["config"] == {"training.beta": 1.0}  # the seed is what repeats differ by
    assert points[6.0]["trials"] == ["trial_0002"]
    assert points[6.0]["robust_acc"] == 0.55 and points[6.0]["robust_acc_std"] is None


def test_the_status_a_job_has_is_a_no_op(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    first = post_event(worker, job_id, "running")
    second = post_event(worker, job_id, "running")
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()
    trail = api.get(f"/v1/jobs/{job_id}/events").json()
    assert [e["to_status"] for e in trail] == ["queued", "submitted", "running"]


@pytest.mark.parametrize(
    ("history", "illegal"),
    [
        (["running", "succeeded"], "running"),
        (["running", "succeeded"], "failed"),
        (["running", "failed"], "succeeded"),
        (["cancel"], "running"),
        (["running", "cancel"], "succeeded"),
    ],
)
def test_after_its_job_ended_a_worker_token_is_403_and_changes_nothing(
    api: httpx.Client, submit: Submit, dispatch: Dispatch, history: list[str], illegal: str
) -> None:
    """A leaked worker token cannot rewrite a finished job: its status, trials or results."""
    job_id = submit()["id"]
    worker = dispatch(job_id)
    put_trial(worker, job_id, "trial_0000", status="running")
    for status in history:
        if status == "cancel":
            assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        else:
            assert post_event(worker, job_id, status).status_code == 200

    def state() -> list[Any]:
        paths = ["", "/events", "/trials", "/trials/trial_0000/metrics"]
        return [api.get(f"/v1/jobs/{job_id}{path}").json() for path in paths]

    before = state()
    trials = f"/v1/internal/jobs/{job_id}/trials"
    late_writes = [
        post_event(worker, job_id, illegal, error="late"),
        worker.put(f"{trials}/t", json={"config": {}, "status": "succeeded", "robust_acc": 0.9}),
        worker.put(f"{trials}/new", json={"config": {}, "status": "running"}),
        worker.post(f"{trials}/t/metrics", json={"epoch": 1, "val_robust_acc": 0.99}),
        upload_checkpoint(worker, job_id, "trial_0000", epoch=1),
    ]
    for response in late_writes:
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "forbidden"
        assert "has ended" in response.json()["error"]["message"]
    assert state() == before


def test_a_queued_job_cannot_run_before_it_is_submitted(
    api: httpx.Client, submit: Submit, worker: Callable[[str], httpx.Client]
) -> None:
    job_id = submit()["id"]
    assert post_event(worker(job_id), job_id, "running").status_code == 409
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_workers_cannot_post_statuses_that_are_not_theirs(
    submit: Submit, dispatch: Dispatch
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    for status in ("cancelled", "queued", "submitted", "done"):
        response = post_event(worker, job_id, status)
        assert response.status_code == 422
        assert response.json()["error"]["fields"][0]["field"] == "status"


def test_a_trial_upserted_three_times_is_one_trial(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    body = {"config": {"training.beta": 3.0}, "status": "succeeded", "clean_acc": 0.9}
    responses = [put_trial(worker, job_id, "trial_0000", **body).json() for _ in range(3)]
    assert without_times(responses) == without_times([responses[0]] * 3)
    trials = api.get(f"/v1/jobs/{job_id}/trials").json()
    assert without_times(trials) == without_times([responses[0]])


def test_a_trial_never_moves_back_and_nulls_never_erase(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    put_trial(
        worker,
        job_id,
        "trial_0000",
        config={"training.beta": 1.0},
        status="succeeded",
        robust_acc=0.4,
    )
    late = put_trial(
        worker, job_id, "trial_0000", status="running", robust_acc=None, clean_acc=0.8
    ).json()
    assert late["status"] == "succeeded"
    assert late["robust_acc"] == 0.4 and late["clean_acc"] == 0.8
    assert late["config"] == {"training.beta": 1.0}
    assert api.get(f"/v1/jobs/{job_id}/trials").json()[0]["status"] == "succeeded"


def test_the_same_metric_posted_twice_is_one_row(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    for _ in range(2):
        post_metrics(worker, job_id, "trial_0000", epoch=1, train_loss=0.7, val_robust_acc=0.3)
    metrics = api.get(f"/v1/jobs/{job_id}/trials/trial_0000/metrics").json()
    assert len(metrics) == 1
    assert metrics[0]["train_loss"] == 0.7 and metrics[0]["val_robust_acc"] == 0.3

    # Metrics before the trial's own report: the trial exists, running, config still unknown.
    trials = api.get(f"/v1/jobs/{job_id}/trials").json()
    assert [(t["key"], t["status"], t["config"]) for t in trials] == [("trial_0000", "running", {})]


# A trial's posts, as a worker sends them in order...
WORKER_POSTS: list[tuple[str, dict[str, Any]]] = [
    ("trial", {"config": {"training.beta": 6.0}, "status": "pending"}),
    ("trial", {"config": {"training.beta": 6.0}, "status": "running"}),
    ("metrics", {"epoch": 1, "train_loss": 0.9, "val_robust_acc": 0.2, "train_epsilon": 0.05}),
    ("metrics", {"epoch": 2, "train_loss": 0.6, "val_robust_acc": 0.3}),
    ("metrics", {"epoch": 2, "lr": 0.05, "train_epsilon": 0.1}),
    ("trial", {"config": {"training.beta": 6.0}, "status": "succeeded", "robust_acc": 0.3}),
    ("trial", {"config": {"training.beta": 6.0}, "best_epoch": 2, "val_robust_acc": 0.3}),
    ("trial", {"config": {"training.beta": 6.0}, "weights": "ema"}),
]
# ...and the rows they leave.
TRIAL_AFTER_POSTS = {
    "key": "trial_0000",
    "config": {"training.beta": 6.0},
    "status": "succeeded",
    "clean_acc": None,
    "robust_acc": 0.3,
    "autoattack_acc": None,
    "autoattack": None,
    "best_epoch": 2,
    "val_clean_acc": None,
    "val_robust_acc": 0.3,
    "weights": "ema",
    "checkpoint": None,
    "error": None,
    "reason": None,
}
METRIC_NAMES = (
    "train_loss train_acc val_clean_acc val_robust_acc lr train_epsilon epoch_seconds "
    "images_per_second"
)
NO_METRICS = dict.fromkeys(METRIC_NAMES.split())
METRICS_AFTER_POSTS = [
    {**NO_METRICS, "epoch": 1, "train_loss": 0.9, "val_robust_acc": 0.2, "train_epsilon": 0.05},
    {
        **NO_METRICS,
        "epoch": 2,
        "train_loss": 0.6,
        "val_robust_acc": 0.3,
        "lr": 0.05,
        "train_epsilon": 0.1,
    },
]


@example(order=WORKER_POSTS, retried=[])
@example(order=WORKER_POSTS[::-1], retried=WORKER_POSTS)
@given(
    order=st.permutations(WORKER_POSTS),
    retried=st.lists(st.sampled_from(WORKER_POSTS), max_size=3),
)
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_posts_in_any_order_leave_the_same_rows(
    api: httpx.Client,
    submit: Submit,
    dispatch: Dispatch,
    order: list[tuple[str, dict[str, Any]]],
    retried: list[tuple[str, dict[str, Any]]],
) -> None:
    """What a flaky network does to a worker's posts: some sent again, all out of order."""
    job_id = submit()["id"]
    worker = dispatch(job_id)
    for kind, body in order + retried:
        if kind == "trial":
            put_trial(worker, job_id, "trial_0000", **body)
        else:
            post_metrics(worker, job_id, "trial_0000", **body)
    trials = api.get(f"/v1/jobs/{job_id}/trials").json()
    assert without_times(trials) == [TRIAL_AFTER_POSTS]
    metrics = api.get(f"/v1/jobs/{job_id}/trials/trial_0000/metrics").json()
    assert without_times(metrics) == METRICS_AFTER_POSTS


def test_reports_are_validated(submit: Submit, dispatch: Dispatch) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    trials = f"/v1/internal/jobs/{job_id}/trials"
    for method, url, body, field in [
        ("POST", f"/v1/internal/jobs/{job_id}/events", {"status": "running"}, "reason"),
        (
            "POST",
            f"/v1/internal/jobs/{job_id}/events",
            {"status": "running", "reason": ""},
            "reason",
        ),
        ("PUT", f"{trials}/has space", {"config": {}}, "path.trial_key"),
        ("PUT", f"{trials}/{'k' * 129}", {"config": {}}, "path.trial_key"),
        ("PUT", f"{trials}/t", {"status": "running"}, "config"),
        ("PUT", f"{trials}/t", {"config": {}, "status": "done"}, "status"),
        ("PUT", f"{trials}/t", {"config": {}, "clean_acc": "high"}, "clean_acc"),
        ("PUT", f"{trials}/t", {"config": {}, "colour": "blue"}, "colour"),
        ("POST", f"{trials}/t/metrics", {"train_loss": 0.1}, "epoch"),
        ("POST", f"{trials}/t/metrics", {"epoch": 0}, "epoch"),
        ("POST", f"{trials}/t/metrics", {"epoch": 1, "lr": "fast"}, "lr"),
        ("POST", f"{trials}/t/metrics", {"epoch": 1, "train_epsilon": 2.0}, "train_epsilon"),
        ("PUT", f"{trials}/t", {"config": {}, "weights": "swa"}, "weights"),
    ]:
        response = worker.request(method, url, json=body)
        assert response.status_code == 422, (url, body, response.text)
        assert field in [f["field"] for f in response.json()["error"]["fields"]]


def test_reports_on_an_unknown_job_are_404(worker: Callable[[str], httpx.Client]) -> None:
    response = post_event(worker("nosuchjob"), "nosuchjob", "running")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "no job 'nosuchjob'"


def test_concurrent_retries_of_the_same_posts_count_once(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    """A worker that retries before its first try has answered: the posts race each other."""
    job_id = submit()["id"]
    worker = dispatch(job_id)

    def post_all(_: int) -> list[int]:
        return [
            post_event(worker, job_id, "running").status_code,
            put_trial(worker, job_id, "trial_0000", config={"training.beta": 1.0}).status_code,
            post_metrics(worker, job_id, "trial_0000", epoch=1, train_loss=0.5).status_code,
        ]

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(post_all, range(6)))
    assert statuses == [[200, 200, 200]] * 6
    trail = api.get(f"/v1/jobs/{job_id}/events").json()
    assert [e["to_status"] for e in trail] == ["queued", "submitted", "running"]
    assert len(api.get(f"/v1/jobs/{job_id}/trials").json()) == 1
    assert len(api.get(f"/v1/jobs/{job_id}/trials/trial_0000/metrics").json()) == 1


def test_a_failed_job_keeps_its_error(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    job_id = submit()["id"]
    worker = dispatch(job_id)
    failed = post_event(worker, job_id, "failed", reason="trial crashed", error="CUDA OOM")
    assert failed.status_code == 200
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["error"]) == ("failed", "CUDA OOM")
    assert job["started_at"] is None and job["finished_at"] is not None


def test_what_a_worker_may_write_is_bounded_by_its_job(
    api: httpx.Client, submit: Submit, dispatch: Dispatch
) -> None:
    """Keys the sweep cannot make, epochs past the spec's, strings past the stated size: each
    refused with 422 naming what is wrong, and nothing written."""
    job_id = submit(training={"epochs": 3})["id"]  # one trial, trial_0000, of 3 epochs
    worker = dispatch(job_id)
    base = f"/v1/internal/jobs/{job_id}/trials"
    refused = [
        (worker.put(f"{base}/trial_0001", json={"config": {}}), "trial_key"),
        (worker.put(f"{base}/beta_6", json={"config": {}}), "trial_key"),
        (worker.post(f"{base}/trial_0000/metrics", json={"epoch": 4}), "epoch"),
        (worker.post(f"{base}/trial_0000/metrics", json={"epoch": 2**31}), "epoch"),
        (worker.put(f"{base}/trial_0000", json={"config": {}, "best_epoch": 9}), "best_epoch"),
        (worker.put(f"{base}/trial_0000", json={"config": {}, "error": "x" * 10_001}), "error"),
        (worker.put(f"{base}/trial_0000", json={"config": {"k": "x" * 10_001}}), "config"),
        (upload_checkpoint(worker, job_id, "trial_0000", epoch=4), "epoch"),
    ]
    for response, field in refused:
        assert response.status_code == 422, response.text
        assert [f["field"] for f in response.json()["error"]["fields"]] == [field]
    assert api.get(f"/v1/jobs/{job_id}/trials").json() == []
    # At the bounds, taken.
    assert worker.post(f"{base}/trial_0000/metrics", json={"epoch": 3}).status_code == 200
    ok = worker.put(f"{base}/trial_0000", json={"config": {}, "error": "x" * 10_000})
    assert ok.status_code == 200
