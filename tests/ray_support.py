"""What the Ray tests share: an ``advorch serve`` process that can be killed and started again,
worker nodes that join the session's head (and can be lost), small job specs, polling, and
reading the processes a job runs in from /proc.

The cluster and the services themselves are session fixtures in conftest.py: one Ray cluster
serves every Ray test (started as ``advorch serve`` starts its own), and the services are real
``advorch serve`` subprocesses pointed at it with ADVORCH_RAY_ADDRESS, so a test can kill a
service alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from service.ray_cluster import LocalRayHead, RayJobs, head_environment

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

    def stop_if_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()

    def client(self) -> httpx.Client:
        token = (self.home / "api_token").read_text().strip()
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


def clean_environment() -> dict[str, str]:
    """This process's environment without any ADVORCH_ setting of the person running it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ADVORCH_", "RAY_"))}


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


class RayNode(Protocol):
    """A Ray node started here: the ``ray start --block`` process its processes descend from."""

    @property
    def process(self) -> subprocess.Popen[bytes]: ...


@dataclass
class WorkerNode:
    """A ``ray start --address ... --block`` process: a second node of the session's cluster,
    on this machine, with a temp dir and custom resources of its own."""

    process: subprocess.Popen[bytes]
    log_file: Path

    def kill(self) -> None:
        """Lose the node as a machine is lost: SIGKILL to its raylet, agents and workers at once
        (the process group its `ray start` leads), nothing told to drain."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Stop it in order (SIGTERM: `ray start --block` stops what it started), then make
        sure nothing of it is left."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        self.kill()


def start_worker_node(
    head: LocalRayHead, temp_dir: Path, *, resources: dict[str, float], num_cpus: int = 1
) -> WorkerNode:
    """Join a worker node to ``head``'s cluster, as `ray start` on another machine would: the
    head's token and environment (service.ray_cluster.head_environment: this Python and
    advorch on PATH), free ports where Ray's defaults are fixed. Returns
    once it started; the cluster shows it a few seconds later (RayJobs.alive_nodes)."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--block",
        f"--address={head.gcs_address}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources)}",
        f"--dashboard-agent-listen-port={free_port()}",  # 52365 by default: one node's only
        "--disable-usage-stats",
    ]
    env = head_environment(head.token_file, Path(sys.executable).parent)
    log_file = temp_dir / "ray-start.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return WorkerNode(process=process, log_file=log_file)


def training_processes(head: LocalRayHead) -> list[str]:
    """The command lines of the processes on the cluster that train a job."""
    return [
        command
        for command in process_tree(head.process.pid).values()
        if any(title in command for title in TRAINING_PROCESS_TITLES)
    ]


def pids_titled(node: RayNode, title: str) -> list[int]:
    """The processes of a Ray node started here (a LocalRayHead, a WorkerNode) whose command
    line holds ``title`` (e.g. ray::ImplicitFunc)."""
    return [pid for pid, command in process_tree(node.process.pid).items() if title in command]


OPEN_TRIAL_STATUSES = {"pending", "running"}


def assert_every_trial_ended(api: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """The invariant of an ended job, as the API shows it: no trial is left pending or
    running, and every trial that did not succeed says why. Returns the trials."""
    job = get(api, f"/v1/jobs/{job_id}")
    assert job["status"] in ("succeeded", "failed", "cancelled"), job["status"]
    trials: list[dict[str, Any]] = get(api, f"/v1/jobs/{job_id}/trials")
    for trial in trials:
        assert trial["status"] not in OPEN_TRIAL_STATUSES, trial
        if trial["status"] != "succeeded":
            assert trial["reason"], f"{trial['key']} is {trial['status']} and says not why"
    return trials


def run_advorch_process(
    env: dict[str, str], *args: str, input: str | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """``advorch ARGS`` as a process of its own, in the environment ``env``; ``input`` is its
    stdin."""
    return subprocess.run(
        [ADVORCH, *args],
        env=env, input=input, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


def run_cli(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``advorch`` CLI as a user runs it against ``service`` (its URL and admin token)."""
    env = clean_environment() | {
        "ADVORCH_HOME": str(service.home),
        "ADVORCH_PORT": str(service.port),
        "ADVORCH_CONFIG_FILE": str(service.home / "cli-config.toml"),
    }
    return run_advorch_process(env, *args)
