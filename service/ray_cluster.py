"""The Ray cluster jobs run on: the local head ``advorch serve`` starts (and stops) when no
``ADVORCH_RAY_ADDRESS`` is given, and ``RayJobs``, the Ray Jobs client of the dispatcher and the
reconciler.

Ray 2.60 protects a cluster with a token. The local head gets its own, kept in
``$ADVORCH_HOME/ray_auth_token``: the head reads it through ``RAY_AUTH_TOKEN_PATH`` (and hands
it to every process of the cluster) and ``RayJobs`` sends it as a bearer token. For a cluster
of your own, give its token as Ray itself takes it: ``RAY_AUTH_TOKEN``, a file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from ray.job_submission import JobDetails, JobSubmissionClient

from service.settings import Settings

T = TypeVar("T")

HEAD_START_TIMEOUT_S = 90.0
HEAD_STOP_TIMEOUT_S = 30.0


@dataclass
class LocalRayHead:
    """A ``ray start --head --block`` process: the whole local cluster lives and dies with it."""

    process: subprocess.Popen[bytes]
    gcs_address: str
    dashboard_url: str
    auth_token: str
    # Where auth_token is kept (the dashboard asks for it).
    token_file: Path
    log_file: Path
    # Ray's own temp dir of this head (its session's logs and sockets), removed when it stops.
    temp_dir: Path

    def stop(self) -> None:
        """Stop the cluster and every process of it; returns when they are gone."""
        if self.process.poll() is None:
            # On SIGTERM `ray start --block` stops the processes it started; the workers
            # those started exit when their raylet does.
            self.process.terminate()
            try:
                self.process.wait(HEAD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Anything of its process group still alive (it has a session of its own) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_head(settings: Settings) -> LocalRayHead:
    """Start a one-node Ray cluster on this machine, with this Python, and wait until its Jobs
    API answers. GCS and every other Ray port are free ports (never Redis's 6379, and never
    the fixed defaults, so two heads can share a machine); the dashboard is on 127.0.0.1."""
    settings.home.mkdir(parents=True, exist_ok=True)
    token_file = settings.home / "ray_auth_token"
    token = _read_or_create_token(token_file)
    gcs_port, dashboard_port, client_port, agent_port = _free_ports(4)
    bin_dir = Path(sys.executable).parent
    # A temp dir of its own, not Ray's shared /tmp/ray: Ray's job supervisor gives each job's
    # driver the GCS address it reads from <temp dir>/ray_current_cluster, which the latest
    # `ray start` on the machine writes. Sharing it, a head started later (another service, a
    # test run) would get this cluster's jobs, which fail there (AuthenticationError). Short
    # (mkdtemp in /tmp): Ray's socket paths below it must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="advorch-ray-"))
    command = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    env = head_environment(token_file, bin_dir)
    log_file = settings.home / "ray-head.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the service, which stops Ray in order
            preexec_fn=_exit_with_parent,
        )
    head = LocalRayHead(
        process=process,
        gcs_address=f"127.0.0.1:{gcs_port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        auth_token=token,
        token_file=token_file,
        log_file=log_file,
        temp_dir=temp_dir,
    )
    try:
        _wait_for_jobs_api(head)
    except BaseException:
        head.stop()
        raise
    return head


def head_environment(
    token_file: Path, bin_dir: Path, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The environment of the local Ray head, which every process of its cluster (each job's
    driver, trial and Train worker) inherits: the service's own, less every ``ADVORCH_``
    setting. Those hold the admin's API token, the server secret that worker tokens are
    derived from and the database URL with its password; a job's code would read them from
    its environment, and Ray shows a node's environment. A job's processes are told what they
    need (workers.job_env) by the dispatcher, in the job's runtime_env."""
    return {
        **{k: v for k, v in environ.items() if not k.startswith("ADVORCH_")},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        # On SIGTERM a head first waits up to 30 s for its node to drain (for Ray Serve);
        # when the service stops, nothing of this cluster is left to drain for.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # Not RAY_preload_python_modules=torch: on 2 cores the idle workers' imports slowed the
        # first trial (POST -> first epoch 11.5-12.9 s with it, 8.9-9.3 s without), and the
        # trials after it reuse their process anyway (docs/benchmarks.md, "Ray jobs").
        # Job entrypoints run `python -m workers.entrypoint`: this Python, with advorch in it.
        "PATH": f"{bin_dir}{os.pathsep}{environ.get('PATH', '')}",
    }


def _wait_for_jobs_api(head: LocalRayHead) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        if head.process.poll() is not None:
            raise RuntimeError(
                f"the Ray head exited with code {head.process.returncode}; "
                f"its log:\n{_tail(head.log_file)}"
            )
        try:
            RayJobs(head.dashboard_url, head.auth_token).client()
            return
        except ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Ray head did not answer at {head.dashboard_url} within "
                    f"{HEAD_START_TIMEOUT_S:.0f} s; its log:\n{_tail(head.log_file)}"
                ) from None
            time.sleep(0.5)


def _exit_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the service dies, even by SIGKILL, so that
    a killed service leaves no Ray cluster behind (Linux; elsewhere a no-op)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _read_or_create_token(path: Path) -> str:
    """The token kept at ``path`` (mode 0600), made at the first start."""
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
    return path.read_text().strip()


def _free_ports(count: int) -> list[int]:
    """Ports free right now, all different (the OS may hand them out again later, but Ray
    takes them within seconds)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def cluster_auth_token() -> str | None:
    """The token of a cluster of the user's own, from where Ray itself looks for it."""
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token.strip()
    path = _cluster_auth_token_file()
    return path.read_text().strip() if path.is_file() else None


def cluster_auth_token_source() -> str:
    """Where ``cluster_auth_token`` found the token, in words (for the serve banner: the
    dashboard asks for the token before it shows anything)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = _cluster_auth_token_file()
    return f"in {path}" if path.is_file() else "none found (RAY_AUTH_TOKEN is unset)"


def _cluster_auth_token_file() -> Path:
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(token_path) if token_path else Path.home() / ".ray" / "auth_token"


class RayJobs:
    """The Ray Jobs API of one cluster, as the service uses it: submit a job under an id of
    ours (idempotently), look a job up, stop it."""

    def __init__(self, address: str, auth_token: str | None) -> None:
        # The Jobs API is the dashboard's: http://host:8265.
        self.address = address.rstrip("/")
        self._headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._client: JobSubmissionClient | None = None

    def client(self) -> JobSubmissionClient:
        """The Jobs client, connected on first use (raises ConnectionError while the cluster
        does not answer)."""
        if self._client is None:
            self._client = JobSubmissionClient(self.address, headers=self._headers)
        return self._client

    def submit(self, submission_id: str, entrypoint: str, env_vars: dict[str, str]) -> None:
        """Start ``entrypoint`` as the Ray Job ``submission_id``, unless that job exists
        already: a retried submission never starts a job twice."""
        if self.info(submission_id) is not None:
            return
        try:
            self.client().submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env={"env_vars": env_vars},
            )
        except RuntimeError as err:
            # Submitted meanwhile by another dispatcher: Ray refuses a second one.
            if "already exists" not in str(err):
                raise

    def info(self, submission_id: str) -> JobDetails | None:
        """The Ray Job's details, or None when the cluster has no such job."""
        return _unless_unknown(lambda: self.client().get_job_info(submission_id))

    def stop(self, submission_id: str) -> None:
        """Stop the Ray Job: its driver gets SIGTERM (then SIGKILL), and the Tune trials and
        Train workers it owns die with it. A job that is unknown or over is left as it is."""
        _unless_unknown(lambda: self.client().stop_job(submission_id))

    def logs(self, submission_id: str) -> str | None:
        """The Ray Job's log (its driver's output), or None when the cluster has no such job."""
        return _unless_unknown(lambda: self.client().get_job_logs(submission_id))

    def alive_nodes(self) -> int | None:
        """How many nodes the cluster has alive, from its dashboard's state API (None when it
        does not say)."""
        try:
            response = httpx.get(
                f"{self.address}/api/v0/nodes", params={"limit": 10_000}, headers=self._headers
            )
            nodes = response.raise_for_status().json()["data"]["result"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return sum(1 for node in nodes if node.get("state") == "ALIVE")

    def dashboard_url(self, submission_id: str) -> str:
        """The job's page on the Ray dashboard."""
        return f"{self.address}/#/jobs/{submission_id}"


def _unless_unknown(call: Callable[[], T]) -> T | None:
    """``call()``, or None when the cluster has no such job: the Jobs client raises a
    RuntimeError naming the HTTP status, and 404 is the one that means "unknown job"."""
    try:
        return call()
    except RuntimeError as err:
        if "status code 404" in str(err):
            return None
        raise
