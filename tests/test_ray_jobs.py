"""Jobs run on a real local Ray cluster, end to end through REST: a TRADES sweep to its results,
a cancel, a training error, the service killed mid-sweep, and `advorch serve` starting and
stopping a Ray head of its own.

One Ray cluster serves the module (started here, as `advorch serve` starts its own); the
service is a real `advorch serve` subprocess pointed at it with ADVORCH_RAY_ADDRESS, so a test
can kill the service alone. Digits, small_cnn, a few epochs and attack steps: CPU-sized.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import select

from service import jobs
from service.db import make_engine, make_session_factory, upgrade_database
from service.models import JobEvent, JobStatus
from service.ray_cluster import LocalRayHead, RayJobs, start_local_head
from service.reconciler import reconcile
from service.settings import Settings
from service.users import BOOTSTRAP_ADMIN, get_user
from workers.data import load_dataset
from workers.evaluate import clean_accuracy
from workers.models import load_checkpoint
from workers.spec import JobSpec

pytestmark = pytest.mark.ray

ADVORCH = str(Path(sys.executable).parent / "advorch")
# Generous: two cores, shared with whatever else runs.
JOB_TIMEOUT_S = 300.0
# The titles of the processes a job trains in: its entrypoint, its Tune trials, their Train
# controllers and workers. (Ray's detached cluster-wide singletons are not the job's.)
TRAINING_PROCESS_TITLES = (
    "workers.entrypoint",
    "ray::ImplicitFunc",
    "ray::TrainController",
    "ray::RayTrainWorker",
)

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = JOB_TIMEOUT_S) -> T:
    """Poll ``probe`` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value is not None and value is not False:
            return value
        time.sleep(0.5)
    raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """An ``advorch serve`` process, which can be killed and started again on the same home."""

    home: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**self.env, "ADVORCH_HOME": str(self.home), "ADVORCH_PORT": str(self.port)}
        with (self.home / "serve.log").open("ab") as log:
            self.process = subprocess.Popen(
                [ADVORCH, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for("the service to answer", self._healthy, timeout_s=120)

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.home / "serve.log").read_text()[-3000:]
            raise AssertionError(f"advorch serve exited with {self.process.returncode}:\n{log}")
        try:
            return httpx.get(f"{self.url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(60)

    def client(self) -> httpx.Client:
        token = (self.home / "api_token").read_text().strip()
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


def clean_environment() -> dict[str, str]:
    """This process's environment without any ADVORCH_ setting of the person running it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ADVORCH_", "RAY_"))}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayHead]:
    head = start_local_head(Settings(home=tmp_path_factory.mktemp("ray-head")))
    yield head
    head.stop()


@pytest.fixture(scope="module")
def service(ray_head: LocalRayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("advorch-home")
    env = clean_environment() | {
        "ADVORCH_RAY_ADDRESS": ray_head.dashboard_url,
        "RAY_AUTH_TOKEN": ray_head.auth_token,  # the cluster's token, as Ray's clients take it
        "ADVORCH_DATA_DIR": str(home / "data"),  # empty: there is no CIFAR-10 here
        "ADVORCH_RECONCILE_INTERVAL_S": "2",
        "ADVORCH_DISPATCH_INTERVAL_S": "0.5",
    }
    service = Service(home=home, env=env)
    service.start()
    yield service
    if service.process is not None and service.process.poll() is None:
        service.stop()


@pytest.fixture(scope="module")
def api(service: Service) -> Iterator[httpx.Client]:
    with service.client() as client:
        yield client


@pytest.fixture(scope="module")
def ray_jobs(ray_head: LocalRayHead) -> RayJobs:
    return RayJobs(ray_head.dashboard_url, ray_head.auth_token)


def trades_spec(name: str, *, epochs: int = 2, **fields: Any) -> dict[str, Any]:
    """A small TRADES job on digits (16 steps an epoch, 2-step attacks)."""
    return {
        "name": name,
        "dataset": {"name": "digits"},
        "model": {"arch": "small_cnn"},
        "training": {
            "method": "trades",
            "epochs": epochs,
            "batch_size": 64,
            "epsilon": 0.1,
            "attack_steps": 2,
        },
        "evaluation": {"attack_steps": 3},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        **fields,
    }


def beta_sweep(*betas: float) -> dict[str, Any]:
    return {
        "parameters": {"training.beta": {"grid": list(betas)}},
        "max_concurrent_trials": 2,
    }


def submit(api: httpx.Client, spec: dict[str, Any]) -> str:
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def get(api: httpx.Client, path: str) -> Any:
    response = api.get(path)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_finished(api: httpx.Client, job_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = get(api, f"/v1/jobs/{job_id}")
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(f"job {job_id} to finish", finished)


def ray_status(ray_jobs: RayJobs, submission_id: str) -> str | None:
    """The status of a Ray Job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    info = ray_jobs.info(submission_id)
    return None if info is None else str(info.status)


def epochs_done(api: httpx.Client, job_id: str) -> int:
    """How many epochs of the job's trials have their metrics in."""
    trials = get(api, f"/v1/jobs/{job_id}/trials")
    return sum(len(get(api, f"/v1/jobs/{job_id}/trials/{t['key']}/metrics")) for t in trials)


def process_tree(root_pid: int) -> dict[int, str]:
    """The live processes descended from ``root_pid`` (itself excluded), with their command
    lines, read from /proc."""
    parents = {pid: ppid for pid, (state, ppid) in _proc_stats().items() if state != "Z"}
    tree: dict[int, str] = {}
    frontier = [root_pid]
    while frontier:
        parent = frontier.pop()
        for pid in [pid for pid, ppid in parents.items() if ppid == parent]:
            try:
                tree[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # gone meanwhile
                continue
            frontier.append(pid)
    return tree


def live(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that are still running (not gone, not zombies)."""
    stats = _proc_stats()
    return [pid for pid in pids if pid in stats and stats[pid][0] != "Z"]


def _proc_stats() -> dict[int, tuple[str, int]]:
    """Every process's state and parent pid."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (name) state ppid ...": the name may hold spaces, so split after it.
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        stats[int(stat.parent.name)] = (state, int(ppid))
    return stats


def training_processes(head: LocalRayHead) -> list[str]:
    """The command lines of the processes on the cluster that train a job."""
    return [
        command
        for command in process_tree(head.process.pid).values()
        if any(title in command for title in TRAINING_PROCESS_TITLES)
    ]


def test_trades_beta_sweep_runs_to_its_results(
    api: httpx.Client, ray_jobs: RayJobs, tmp_path: Path
) -> None:
    job_id = submit(api, trades_spec("beta-sweep", sweep=beta_sweep(0.0, 1.0, 6.0)))

    job = wait_until_finished(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["ray_submission_id"] == f"advorch-{job_id}"
    assert job["dashboard_url"].endswith(f"/#/jobs/advorch-{job_id}")
    wait_for(
        "its Ray Job to end", lambda: ray_status(ray_jobs, f"advorch-{job_id}") == "SUCCEEDED", 60
    )

    trials = get(api, f"/v1/jobs/{job_id}/trials")
    assert sorted(t["config"]["training.beta"] for t in trials) == [0.0, 1.0, 6.0]
    for trial in trials:
        assert trial["status"] == "succeeded"
        assert 0.0 <= trial["robust_acc"] <= trial["clean_acc"] <= 1.0
        assert trial["best_epoch"] in (1, 2)
        epochs = get(api, f"/v1/jobs/{job_id}/trials/{trial['key']}/metrics")
        assert [e["epoch"] for e in epochs] == [1, 2]
        for name in ("train_loss", "train_acc", "val_clean_acc", "val_robust_acc", "lr"):
            assert all(e[name] is not None for e in epochs), name
        assert all(e["epoch_seconds"] > 0 and e["images_per_second"] > 0 for e in epochs)

    tradeoff = get(api, f"/v1/jobs/{job_id}/tradeoff")
    assert {p["key"] for p in tradeoff["points"]} == {t["key"] for t in trials}
    assert tradeoff["front"]

    # The best checkpoint of a trial, as served, is the model its final metrics were made with.
    trial = trials[0]
    response = api.get(f"/v1/jobs/{job_id}/trials/{trial['key']}/checkpoint")
    assert response.status_code == 200, response.text
    (tmp_path / "best.pt").write_bytes(response.content)
    model = load_checkpoint(tmp_path / "best.pt")
    x_test, y_test = load_dataset("digits", "test")
    assert model(x_test).shape == (len(x_test), 10)
    assert clean_accuracy(model, x_test, y_test) == pytest.approx(trial["clean_acc"])


def test_a_trial_trains_data_parallel_across_its_workers(api: httpx.Client) -> None:
    # Two Train workers of half a CPU each: DDP over gloo, each on its shard of the data, with
    # TRADES's two forward passes before each backward.
    resources = {"num_workers": 2, "cpus_per_worker": 0.5}
    job_id = submit(api, trades_spec("ddp", epochs=1, resources=resources))

    job = wait_until_finished(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    (trial,) = get(api, f"/v1/jobs/{job_id}/trials")
    assert trial["status"] == "succeeded" and trial["robust_acc"] is not None
    assert "world_size=2" in get(api, f"/v1/jobs/{job_id}/logs")["logs"]


def test_a_lost_worker_resumes_from_its_last_checkpoint(
    api: httpx.Client, ray_head: LocalRayHead
) -> None:
    job_id = submit(api, trades_spec("lose-a-worker", epochs=10))
    wait_for("three epochs", lambda: epochs_done(api, job_id) >= 3)
    # Ray Train's controller takes in a checkpoint when it next polls its workers (about every
    # 2 s): a worker lost before that restarts from the checkpoint before, or from scratch.
    time.sleep(3)
    worker_pid = wait_for("the Train worker", lambda: train_worker_pid(ray_head), 30)
    os.kill(worker_pid, signal.SIGKILL)

    job = wait_until_finished(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    (trial,) = get(api, f"/v1/jobs/{job_id}/trials")
    assert trial["status"] == "succeeded"
    epochs = get(api, f"/v1/jobs/{job_id}/trials/{trial['key']}/metrics")
    assert [e["epoch"] for e in epochs] == list(range(1, 11))
    # FailureConfig restarted the workers, and they went on from a checkpoint, not epoch 1.
    assert "resuming after epoch" in get(api, f"/v1/jobs/{job_id}/logs")["logs"]


def train_worker_pid(head: LocalRayHead) -> int | None:
    pids = [
        pid
        for pid, command in process_tree(head.process.pid).items()
        if "ray::RayTrainWorker" in command
    ]
    return pids[0] if pids else None


def test_an_optuna_search_under_asha_stops_the_weak_trial_early(api: httpx.Client) -> None:
    # Seeded (training.seed 0), Optuna proposes beta 6 and then beta 0, one at a time. Beta 0
    # trains for no robustness, so after epoch 1 its robust accuracy is below beta 6's at the
    # same epoch, and ASHA stops it there.
    sweep = {
        "parameters": {"training.beta": {"choice": [0.0, 6.0]}},
        "search": "optuna",
        "num_samples": 2,
        "scheduler": "asha",
        "max_concurrent_trials": 1,
    }
    job_id = submit(api, trades_spec("optuna-asha", epochs=2, sweep=sweep))

    job = wait_until_finished(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    trials = {t["config"]["training.beta"]: t for t in get(api, f"/v1/jobs/{job_id}/trials")}
    assert sorted(trials) == [0.0, 6.0]
    assert trials[6.0]["status"] == "succeeded" and trials[6.0]["robust_acc"] is not None
    assert trials[0.0]["status"] == "stopped" and trials[0.0]["robust_acc"] is None
    epochs = {
        beta: [e["epoch"] for e in get(api, f"/v1/jobs/{job_id}/trials/{t['key']}/metrics")]
        for beta, t in trials.items()
    }
    assert epochs[6.0] == [1, 2]
    # Stopped at epoch 1's result; its workers may have posted epoch 2 before they were killed.
    assert epochs[0.0][0] == 1


def test_cancel_stops_the_ray_job_and_its_training(
    api: httpx.Client, ray_jobs: RayJobs, ray_head: LocalRayHead
) -> None:
    job_id = submit(api, trades_spec("to-cancel", epochs=200))
    wait_for("the first epoch", lambda: epochs_done(api, job_id) > 0)
    assert training_processes(ray_head), "the job trains in these processes"

    response = api.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"

    wait_for(
        "Ray to stop the job", lambda: ray_status(ray_jobs, f"advorch-{job_id}") == "STOPPED", 60
    )
    wait_for("the job's training processes to exit", lambda: not training_processes(ray_head), 60)
    assert get(api, f"/v1/jobs/{job_id}")["status"] == "cancelled"


def test_a_training_error_fails_the_job_with_its_message(api: httpx.Client) -> None:
    spec = trades_spec("no-cifar", epochs=1) | {"dataset": {"name": "cifar10"}}
    job_id = submit(api, spec)

    job = wait_until_finished(api, job_id)
    assert job["status"] == "failed"
    assert "FileNotFoundError: CIFAR-10 folder not found" in job["error"]
    (trial,) = get(api, f"/v1/jobs/{job_id}/trials")
    assert trial["status"] == "failed"
    assert "CIFAR-10 folder not found" in trial["error"]
    # The Ray Job's own log, through the API (what `advorch logs` prints), tells the same.
    assert "CIFAR-10 folder not found" in get(api, f"/v1/jobs/{job_id}/logs")["logs"]


def test_a_sweep_survives_the_service_being_killed(service: Service, api: httpx.Client) -> None:
    epochs = 3
    job_id = submit(api, trades_spec("survivor", epochs=epochs, sweep=beta_sweep(0.0, 6.0)))
    wait_for("the first epoch", lambda: epochs_done(api, job_id) > 0)

    service.stop(signal.SIGKILL)
    time.sleep(3)  # the workers keep training, and retry their posts
    service.start()

    job = wait_until_finished(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    trials = get(api, f"/v1/jobs/{job_id}/trials")
    assert sorted(t["config"]["training.beta"] for t in trials) == [0.0, 6.0]
    for trial in trials:
        assert trial["status"] == "succeeded" and trial["robust_acc"] is not None
        epochs_seen = [
            e["epoch"] for e in get(api, f"/v1/jobs/{job_id}/trials/{trial['key']}/metrics")
        ]
        assert epochs_seen == list(range(1, epochs + 1))
    engine = make_engine(f"sqlite:///{service.home / 'advorch.db'}")
    with engine.connect() as connection:
        events = connection.scalars(
            select(JobEvent.to_status).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
    engine.dispose()
    assert events == ["queued", "submitted", "running", "succeeded"]


def test_serve_starts_and_stops_its_own_ray_head(tmp_path: Path) -> None:
    service = Service(home=tmp_path, env=clean_environment())
    service.start()
    assert service.process is not None
    started = process_tree(service.process.pid)
    banner = (tmp_path / "serve.log").read_text()
    assert f"API:           {service.url}" in banner
    assert f"in {tmp_path / 'api_token'}" in banner
    dashboard = banner.split("Ray dashboard: ")[1].split()[0]
    token = (tmp_path / "ray_auth_token").read_text().strip()
    assert RayJobs(dashboard, token).client().list_jobs() == []
    assert any("gcs_server" in command for command in started.values())

    assert service.stop(signal.SIGTERM) == 0
    wait_for("every process of the Ray head to exit", lambda: not live(started), timeout_s=30)


def test_a_retried_submission_starts_one_ray_job(ray_jobs: RayJobs) -> None:
    submission_id = f"advorch-test-{uuid.uuid4().hex}"
    try:
        ray_jobs.submit(submission_id, "sleep 600", {})
        ray_jobs.submit(submission_id, "sleep 600", {})
        submitted = [job.submission_id for job in ray_jobs.client().list_jobs()]
        assert submitted.count(submission_id) == 1
    finally:
        ray_jobs.stop(submission_id)


def test_the_reconciler_gives_jobs_their_ray_outcome(ray_jobs: RayJobs, tmp_path: Path) -> None:
    """Jobs whose workers never reported their end: each takes what Ray knows of it."""
    settings = Settings(home=tmp_path)
    upgrade_database(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    session_factory = make_session_factory(engine)
    entrypoints = {
        "crashed": "python -c \"print('no spec to run'); raise SystemExit(3)\"",
        "stopped": "sleep 600",
        "running": "sleep 600",
        "unknown": None,  # never submitted: as if the cluster had been replaced
    }
    job_ids, submission_ids = {}, {}
    with session_factory() as session:
        admin = get_user(session, BOOTSTRAP_ADMIN)  # made by the migrations
        for name, entrypoint in entrypoints.items():
            job = jobs.create_job(session, JobSpec(name=name), settings, owner=admin)
            job_ids[name], submission_ids[name] = job.id, f"advorch-test-{job.id}"
            if entrypoint is not None:
                ray_jobs.submit(submission_ids[name], entrypoint, {})
            jobs.mark_submitted(
                session, job, ray_submission_id=submission_ids[name], dashboard_url=""
            )
    try:
        ray_jobs.stop(submission_ids["stopped"])
        for name, status in [("crashed", "FAILED"), ("stopped", "STOPPED")]:
            sid = submission_ids[name]
            wait_for(f"{sid} to end", lambda: ray_status(ray_jobs, sid) == status, 60)  # noqa: B023

        reconcile(session_factory, ray_jobs)

        with session_factory() as session:
            reconciled = {name: jobs.get_job(session, i) for name, i in job_ids.items()}
        assert reconciled["crashed"].status == JobStatus.FAILED
        assert "no spec to run" in (reconciled["crashed"].error or "")
        assert reconciled["stopped"].status == JobStatus.CANCELLED
        assert reconciled["unknown"].status == JobStatus.FAILED
        assert f"has no job {submission_ids['unknown']}" in (reconciled["unknown"].error or "")
        assert reconciled["running"].status == JobStatus.SUBMITTED
    finally:
        ray_jobs.stop(submission_ids["running"])
        engine.dispose()
