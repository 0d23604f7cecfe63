"""Jobs run on a real local Ray cluster, end to end through REST, every way a job can end: a
TRADES sweep to its results, a lost Train worker or trial process resumed from its checkpoint,
ASHA and successive halving stopping trials, a cancel, a training error, the service killed
mid-sweep, Ray outcomes the reconciler finds, and `advorch serve` starting and stopping a Ray
head of its own. After each, the invariant of an ended job holds on the API's view: no trial
left running, and every trial that did not succeed says why.

Digits, small_cnn, a few epochs and attack steps: CPU-sized.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from service import jobs
from service.db import make_engine, make_session_factory
from service.models import Job, JobStatus, TrialStatus
from service.ray_cluster import LocalRayHead, RayJobs
from service.users import BOOTSTRAP_ADMIN, get_user
from tests.ray_support import (
    Service,
    assert_every_trial_ended,
    beta_sweep,
    clean_environment,
    epochs_done,
    get,
    live,
    pids_titled,
    process_tree,
    ray_status,
    submit,
    trades_spec,
    training_processes,
    wait_for,
    wait_until_finished,
)
from workers.data import load_dataset
from workers.evaluate import clean_accuracy
from workers.models import load_checkpoint, read_checkpoint_meta
from workers.spec import JobSpec

pytestmark = pytest.mark.ray


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """The keys of the points no other point is at least as good as on both axes and better on
    one: the front, computed here from the trials' own numbers."""
    return {
        key
        for key, (clean, robust) in points.items()
        if not any(
            c >= clean and r >= robust and (c, r) != (clean, robust) for c, r in points.values()
        )
    }


def test_a_trades_beta_sweep_runs_to_its_results_through_a_killed_service(
    service: Service, ray_api: httpx.Client, ray_jobs: RayJobs, tmp_path: Path
) -> None:
    """The sweep of the README, with the service SIGKILLed after the first epoch and started
    again: the trials keep training and retry their posts, the third trial starts under the
    new service, and the job ends with every epoch of every trial and the right best trial."""
    job_id = submit(ray_api, trades_spec("beta-sweep", sweep=beta_sweep(0.0, 1.0, 6.0)))
    wait_for("the first epoch", lambda: epochs_done(ray_api, job_id) > 0)
    service.stop(signal.SIGKILL)
    time.sleep(3)  # the workers keep training, and retry their posts
    service.start()

    job = wait_until_finished(ray_api, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["ray_submission_id"] == f"advorch-{job_id}"
    assert job["dashboard_url"].endswith(f"/#/jobs/advorch-{job_id}")
    wait_for(
        "its Ray Job to end", lambda: ray_status(ray_jobs, f"advorch-{job_id}") == "SUCCEEDED", 60
    )

    trials = assert_every_trial_ended(ray_api, job_id)
    assert sorted(t["config"]["training.beta"] for t in trials) == [0.0, 1.0, 6.0]
    for trial in trials:
        assert trial["status"] == "succeeded"
        assert 0.0 <= trial["robust_acc"] <= trial["clean_acc"] <= 1.0
        epochs = get(ray_api, f"/v1/jobs/{job_id}/trials/{trial['key']}/metrics")
        assert [e["epoch"] for e in epochs] == [1, 2]
        for name in ("train_loss", "train_acc", "val_clean_acc", "val_robust_acc", "lr"):
            assert all(e[name] is not None for e in epochs), name
        assert all(e["epoch_seconds"] > 0 and e["images_per_second"] > 0 for e in epochs)
        # The best epoch is the one of highest validation robust accuracy (the first of
        # equals), and the trial keeps that epoch's validation numbers and checkpoint.
        scores = [e["val_robust_acc"] for e in epochs]
        assert trial["best_epoch"] == 1 + scores.index(max(scores))
        assert trial["val_robust_acc"] == max(scores)
        assert trial["checkpoint"]["epoch"] == trial["best_epoch"]

    events = [e["to_status"] for e in get(ray_api, f"/v1/jobs/{job_id}/events")]
    assert events == ["queued", "submitted", "running", "succeeded"]

    # The job's best trial is the best by validation, whatever the test numbers say.
    best = max(trials, key=lambda t: (t["val_robust_acc"], t["val_clean_acc"]))
    assert job["best_trial"]["key"] == best["key"]

    # The trade-off's front is the one the trials' own numbers make.
    tradeoff = get(ray_api, f"/v1/jobs/{job_id}/tradeoff")
    points = {t["key"]: (t["clean_acc"], t["robust_acc"]) for t in trials}
    assert sorted(p["trials"][0] for p in tradeoff["points"]) == sorted(points)
    assert {p["trials"][0] for p in tradeoff["front"]} == pareto_front(points)

    # The best checkpoint of a trial, as served, is the model its final metrics were made with.
    trial = trials[0]
    response = ray_api.get(f"/v1/jobs/{job_id}/trials/{trial['key']}/checkpoint")
    assert response.status_code == 200, response.text
    (tmp_path / "best.pt").write_bytes(response.content)
    model = load_checkpoint(tmp_path / "best.pt")
    x_test, y_test = load_dataset("digits", "test")
    assert clean_accuracy(model, x_test, y_test) == pytest.approx(trial["clean_acc"])


@pytest.mark.slow
def test_a_lost_trial_process_resumes_from_its_last_checkpoint_in_an_awp_ema_sweep(
    ray_api: httpx.Client, ray_head: LocalRayHead, tmp_path: Path
) -> None:
    """One worker a trial: each trains in its own process (Ray Train's local mode). Issue 12's
    fields through the whole service: a sweep over the nested training.awp.gamma, with an EMA
    of the weights and an epsilon warm-up. One trial's process killed after its first epoch,
    Tune runs it again from its last checkpoint; both trials say their numbers are of the EMA
    weights, and each epoch the training epsilon it used."""
    epochs = 5
    sweep = {"parameters": {"training.awp.gamma": {"grid": [0.0, 0.01]}}}
    spec = trades_spec("awp-sweep", epochs=epochs, sweep=sweep | {"max_concurrent_trials": 2})
    spec["training"] |= {"ema": {"decay": 0.5}, "epsilon_warmup_epochs": 1}
    job_id = submit(ray_api, spec)

    def every_trial_has_an_epoch() -> bool:
        trials = get(ray_api, f"/v1/jobs/{job_id}/trials")
        return len(trials) == 2 and all(
            get(ray_api, f"/v1/jobs/{job_id}/trials/{t['key']}/metrics") for t in trials
        )

    wait_for("an epoch of each trial", every_trial_has_an_epoch)
    pids = wait_for("the trials' processes", lambda: pids_titled(ray_head, "ray::ImplicitFunc"), 30)
    os.kill(pids[0], signal.SIGKILL)

    job = wait_until_finished(ray_api, job_id)
    assert job["status"] == "succeeded", job["error"]
    trials = assert_every_trial_ended(ray_api, job_id)
    assert sorted(t["config"]["training.awp.gamma"] for t in trials) == [0.0, 0.01]
    for trial in trials:
        assert trial["status"] == "succeeded" and trial["weights"] == "ema"
        metrics = get(ray_api, f"/v1/jobs/{job_id}/trials/{trial['key']}/metrics")
        assert [e["epoch"] for e in metrics] == list(range(1, epochs + 1))
        # 16 steps an epoch, a warm-up of one epoch: epoch 1's last step is at 15/16 of 0.1.
        warmed_up = [0.1 * 15 / 16] + [0.1] * (epochs - 1)
        assert [e["train_epsilon"] for e in metrics] == pytest.approx(warmed_up)
    # Tune ran the killed trial again from a checkpoint, not from epoch 1.
    assert "resuming after epoch" in get(ray_api, f"/v1/jobs/{job_id}/logs")["logs"]
    response = ray_api.get(f"/v1/jobs/{job_id}/trials/{trials[0]['key']}/checkpoint")
    assert response.status_code == 200, response.text
    (tmp_path / "best.pt").write_bytes(response.content)
    assert read_checkpoint_meta(tmp_path / "best.pt")["weights"] == "ema"


@pytest.mark.slow
def test_a_data_parallel_trial_survives_a_lost_worker(
    ray_api: httpx.Client, ray_head: LocalRayHead
) -> None:
    """Two Ray Train workers of half a CPU each: DDP over gloo, each on its shard of the data;
    one killed, Train restarts the workers from the last checkpoint."""
    resources = {"num_workers": 2, "cpus_per_worker": 0.5}
    job_id = submit(ray_api, trades_spec("ddp", epochs=5, resources=resources))
    wait_for("two epochs", lambda: epochs_done(ray_api, job_id) >= 2)
    # Ray Train's controller takes in a checkpoint when it next polls its workers (about every
    # 2 s): a worker lost before that restarts from the checkpoint before, or from scratch.
    time.sleep(3)
    workers = wait_for("the Train workers", lambda: pids_titled(ray_head, "ray::RayTrainWorker"))
    os.kill(workers[0], signal.SIGKILL)

    job = wait_until_finished(ray_api, job_id)
    assert job["status"] == "succeeded", job["error"]
    (trial,) = assert_every_trial_ended(ray_api, job_id)
    assert trial["status"] == "succeeded" and trial["robust_acc"] is not None
    epochs = get(ray_api, f"/v1/jobs/{job_id}/trials/{trial['key']}/metrics")
    assert [e["epoch"] for e in epochs] == list(range(1, 6))
    logs = get(ray_api, f"/v1/jobs/{job_id}/logs")["logs"]
    assert "world_size=2" in logs
    assert "resuming after epoch" in logs


def test_an_optuna_search_under_asha_stops_the_weak_trial_early(ray_api: httpx.Client) -> None:
    # Seeded (training.seed 0), Optuna proposes beta 6 and then beta 0, one at a time. Beta 0
    # trains for no robustness, so after epoch 1 its robust accuracy is below beta 6's at the
    # same epoch, and ASHA stops it there. Each sample trains with its own seed.
    sweep = {
        "parameters": {"training.beta": {"choice": [0.0, 6.0]}},
        "search": "optuna",
        "num_samples": 2,
        "scheduler": "asha",
        "max_concurrent_trials": 1,
    }
    job_id = submit(ray_api, trades_spec("optuna-asha", epochs=2, sweep=sweep))

    job = wait_until_finished(ray_api, job_id)
    assert job["status"] == "succeeded", job["error"]
    trials = {t["config"]["training.beta"]: t for t in assert_every_trial_ended(ray_api, job_id)}
    assert sorted(trials) == [0.0, 6.0]
    assert trials[6.0]["status"] == "succeeded" and trials[6.0]["robust_acc"] is not None
    assert trials[0.0]["status"] == "stopped" and trials[0.0]["robust_acc"] is None
    assert trials[0.0]["reason"] == "stopped early by ASHA after epoch 1 of 2"
    assert {t["config"]["training.seed"] for t in trials.values()} == {0, 1}
    epochs = {
        beta: [e["epoch"] for e in get(ray_api, f"/v1/jobs/{job_id}/trials/{t['key']}/metrics")]
        for beta, t in trials.items()
    }
    assert epochs[6.0] == [1, 2]
    # Stopped at epoch 1's result; its process may have posted epoch 2 before it was killed.
    assert epochs[0.0][0] == 1


def test_successive_halving_waits_for_every_trial_at_a_rung_and_resumes_the_best(
    service: Service, ray_api: httpx.Client
) -> None:
    # 4 epochs: rungs after epochs 1 and 2 (workers.halving.halving_rungs). One trial at a
    # time: beta 6 and then beta 1 train to epoch 1 and wait there, paused, for beta 0; then
    # the best of the three at epoch 1 (one in three goes on) resumes, is alone at epoch 2, and
    # trains to the end. Beta 0 trains for no robustness: it is never the best.
    sweep = {**beta_sweep(6.0, 1.0, 0.0), "scheduler": "halving", "max_concurrent_trials": 1}
    job_id = submit(ray_api, trades_spec("halving", epochs=4, sweep=sweep))

    job = wait_until_finished(ray_api, job_id)
    assert job["status"] == "succeeded", job["error"]
    trials = {t["config"]["training.beta"]: t for t in assert_every_trial_ended(ray_api, job_id)}
    metrics = {
        beta: get(ray_api, f"/v1/jobs/{job_id}/trials/{t['key']}/metrics")
        for beta, t in trials.items()
    }
    at_rung = {beta: rows[0]["val_robust_acc"] for beta, rows in metrics.items()}
    best = max(at_rung, key=lambda beta: at_rung[beta])
    assert best != 0.0, at_rung
    assert trials[best]["status"] == "succeeded" and trials[best]["robust_acc"] is not None
    assert [row["epoch"] for row in metrics[best]] == [1, 2, 3, 4]
    for beta in at_rung.keys() - {best}:
        assert trials[beta]["status"] == "stopped" and trials[beta]["robust_acc"] is None
        assert trials[beta]["reason"] == "stopped early by successive halving after epoch 1 of 4"
        assert [row["epoch"] for row in metrics[beta]] == [1]
    # Synchronous: the best went on only once every trial had reached the rung.
    posted = {
        beta: [datetime.fromisoformat(row["created_at"]) for row in rows]
        for beta, rows in metrics.items()
    }
    assert posted[best][1] > max(times[0] for times in posted.values())
    # It resumed from its checkpoint at the rung: Tune's record of what it trained has each
    # epoch once (a restart from scratch would train epoch 1 again).
    (record,) = service.home.glob(f"**/{job_id}-sweep/{trials[best]['key']}/result.json")
    trained = [json.loads(line)["epoch"] for line in record.read_text().splitlines()]
    assert trained == [1, 2, 3, 4]


def test_cancel_after_the_first_metric_ends_every_trial_and_stops_the_training(
    ray_api: httpx.Client, ray_jobs: RayJobs, ray_head: LocalRayHead
) -> None:
    job_id = submit(ray_api, trades_spec("to-cancel", epochs=200, sweep=beta_sweep(1.0, 6.0)))
    wait_for("the first epoch", lambda: epochs_done(ray_api, job_id) > 0)
    assert training_processes(ray_head), "the job trains in these processes"

    response = ray_api.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    # At once, in the same transaction as the job: no trial of it runs any more.
    trials = assert_every_trial_ended(ray_api, job_id)
    assert {(t["status"], t["reason"]) for t in trials} == {("cancelled", "cancelled by admin")}

    wait_for(
        "Ray to stop the job", lambda: ray_status(ray_jobs, f"advorch-{job_id}") == "STOPPED", 60
    )
    wait_for("the job's training processes to exit", lambda: not training_processes(ray_head), 60)
    assert get(ray_api, f"/v1/jobs/{job_id}")["status"] == "cancelled"
    assert assert_every_trial_ended(ray_api, job_id) == trials  # late posts changed nothing


def test_a_missing_data_set_fails_the_job_with_its_message(ray_api: httpx.Client) -> None:
    spec = trades_spec("no-cifar", epochs=1) | {"dataset": {"name": "cifar10"}}
    job_id = submit(ray_api, spec)

    job = wait_until_finished(ray_api, job_id)
    assert job["status"] == "failed"
    assert "FileNotFoundError: CIFAR-10 folder not found" in job["error"]
    (trial,) = assert_every_trial_ended(ray_api, job_id)
    assert trial["status"] == "failed"
    assert trial["error"].startswith("FileNotFoundError: CIFAR-10 folder not found")
    assert trial["reason"] == trial["error"].splitlines()[0]
    # The Ray Job's own log, through the API (what `advorch logs` prints), tells the same.
    assert "CIFAR-10 folder not found" in get(ray_api, f"/v1/jobs/{job_id}/logs")["logs"]


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)],
    ids=lambda sig: sig.name,
)
def test_serve_starts_its_own_ray_head_and_leaves_none_behind(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """Stopped (SIGTERM) or killed (SIGKILL), `advorch serve` leaves no process behind: neither
    its Ray head nor its API workers."""
    home = tmp_path
    secrets = {"ADVORCH_API_TOKEN": "serve-admin-token", "ADVORCH_SECRET_KEY": "s3cret"}
    service = Service(home=home, env=clean_environment() | secrets)
    service.start()
    assert service.process is not None
    started = process_tree(service.process.pid)
    assert any("gcs_server" in command for command in started.values())
    assert any("raylet" in command for command in started.values())
    # The cluster's processes do not inherit the service's secrets (its own API workers,
    # the service itself, do); the workers are in `started`, so they must exit too.
    assert sum("multiprocessing.spawn" in command for command in started.values()) == 2
    for pid, command in started.items():
        if "multiprocessing" in command:
            continue
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"serve-admin-token" not in environ and b"s3cret" not in environ
    if sig == signal.SIGTERM:
        banner = (home / "serve.log").read_text()
        assert f"API:           {service.url}" in banner
        dashboard = banner.split("Ray dashboard: ")[1].split()[0]
        token = (home / "ray_auth_token").read_text().strip()
        assert RayJobs(dashboard, token).client().list_jobs() == []

    exit_code = service.stop(sig)
    assert exit_code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    try:
        wait_for(f"the Ray head to exit after {sig.name}", lambda: not live(started), 30)
    except AssertionError as error:
        left = "\n".join(started[pid][:200] for pid in live(started))
        raise AssertionError(f"{error}; still running:\n{left}") from None
    with pytest.raises(httpx.TransportError):  # no API worker left to answer
        httpx.get(f"{service.url}/healthz", timeout=5)


def test_a_retried_submission_starts_one_ray_job(ray_jobs: RayJobs) -> None:
    submission_id = f"advorch-test-{uuid.uuid4().hex}"
    try:
        ray_jobs.submit(submission_id, "sleep 600", {})
        ray_jobs.submit(submission_id, "sleep 600", {})
        submitted = [job.submission_id for job in ray_jobs.client().list_jobs()]
        assert submitted.count(submission_id) == 1
    finally:
        ray_jobs.stop(submission_id)


def test_the_reconciler_gives_jobs_their_ray_outcome_and_ends_their_trials(
    service: Service, ray_api: httpx.Client, ray_jobs: RayJobs
) -> None:
    """Jobs whose workers never reported their end, each with a trial left running: the
    service's reconciler gives each what Ray knows of it, and ends its trials with it."""
    entrypoints = {
        "crashed": "python -c \"print('no spec to run'); raise SystemExit(3)\"",
        "stopped": "sleep 600",
        "succeeded": "python -c \"print('done')\"",
        "running": "sleep 600",
        "unknown": None,  # never submitted: as if the cluster had been replaced
    }
    engine = make_engine(f"sqlite:///{service.home / 'advorch.db'}")
    session_factory = make_session_factory(engine)
    job_ids: dict[str, str] = {}
    with session_factory() as session:
        admin = get_user(session, BOOTSTRAP_ADMIN)
        for name, entrypoint in entrypoints.items():
            # Made as submitted at once: a queued one would be the service's to dispatch.
            job_id = jobs.new_job_id()
            submission_id = f"advorch-test-{job_id}"
            if entrypoint is not None:
                ray_jobs.submit(submission_id, entrypoint, {})
            spec = JobSpec(name=f"reconcile-{name}")
            job = Job(
                id=job_id,
                name=spec.name,
                status=JobStatus.SUBMITTED,
                owner=admin,
                spec=spec.model_dump(mode="json"),
                num_trials=1,
                ray_submission_id=submission_id,
                dashboard_url="",
            )
            session.add(job)
            session.commit()
            jobs.upsert_trial(session, job, "trial_0000", status=TrialStatus.RUNNING)
            job_ids[name] = job_id
    engine.dispose()
    try:
        ray_jobs.stop(f"advorch-test-{job_ids['stopped']}")
        expected = {"crashed": "failed", "stopped": "cancelled", "succeeded": "succeeded",
                    "unknown": "failed"}  # fmt: skip
        for name, status in expected.items():
            wait_for(
                f"the reconciler to make {name} {status}",
                lambda: get(ray_api, f"/v1/jobs/{job_ids[name]}")["status"] == status,  # noqa: B023
                60,
            )
            trials = assert_every_trial_ended(ray_api, job_ids[name])
            assert trials[0]["status"] == ("cancelled" if status == "cancelled" else "failed")
        crashed = get(ray_api, f"/v1/jobs/{job_ids['crashed']}")
        assert "no spec to run" in crashed["error"]
        unknown = get(ray_api, f"/v1/jobs/{job_ids['unknown']}")
        assert f"has no job advorch-test-{job_ids['unknown']}" in unknown["error"]
        succeeded_trial = get(ray_api, f"/v1/jobs/{job_ids['succeeded']}/trials")[0]
        assert succeeded_trial["reason"] == "its end was never reported: the job ended first"
        # A job still running on Ray is left alone, its trial too.
        assert get(ray_api, f"/v1/jobs/{job_ids['running']}")["status"] == "submitted"
        assert get(ray_api, f"/v1/jobs/{job_ids['running']}/trials")[0]["status"] == "running"
    finally:
        ray_jobs.stop(f"advorch-test-{job_ids['running']}")
