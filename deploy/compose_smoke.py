"""The compose stack, run for real on this host's Docker: ``deploy/compose-smoke`` (or
``make compose-smoke``). Not part of the test suite or ``.ci/run``: it needs a Docker engine and
takes about ten minutes.

It builds the image, brings the CPU stack (docker-compose.yml) up under its own project name
with fresh tokens and free ports, and then, through the ``advorch`` CLI and the REST API as a
user would: runs the digits TRADES sweep to ``succeeded``; gets the web page; downloads a
checkpoint and loads it; checks that the Ray dashboard wants the token; SIGKILLs the API
container after a job's first metric and sees the job succeed with every epoch; SIGKILLs the
Ray worker container mid-trial and sees the trial resume, or the job fail saying the node was
lost, with no trial left ``running``; restarts the whole stack and finds the jobs and
checkpoints again; then ``down -v``. Each step prints its time; the first failure ends the run
(exit 1) unless ``--keep-going``.

On a host without Docker Hub, point the images at local ones:
    BASE_IMAGE=local/python:3.11-slim POSTGRES_IMAGE=local/postgres:15 deploy/compose-smoke
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages, as in the venv

from service.client import AdvorchClient  # noqa: E402
from workers.models import load_checkpoint  # noqa: E402

PROJECT = "advorch-smoke"
SWEEP_SPEC = ROOT / "examples" / "trades_beta_sweep.yaml"
FINISHED = {"succeeded", "failed", "cancelled"}
HEALTHY_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 900.0


class StepFailed(Exception):
    """A check of the stack did not hold; the message says what was seen."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise StepFailed(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_until(what: str, timeout_s: float, probe: Callable[[], Any], every_s: float = 2.0) -> Any:
    """Call ``probe`` until it returns something truthy; StepFailed after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class Stack:
    """The CPU compose stack under its own project name, and a user's view of it."""

    def __init__(self, compose: list[str], image: str, workdir: Path) -> None:
        self.compose = compose
        self.image = image
        self.workdir = workdir
        self.api_port = free_port()
        self.dashboard_port = free_port()
        self.ray_token = secrets.token_hex(32)
        self.api_token = secrets.token_hex(32)
        # Not the developer's .env (it may select the GPU file): everything comes from here.
        self.env_file = workdir / "smoke.env"
        self.env_file.write_text("")
        self.env = {
            **os.environ,
            "RAY_AUTH_TOKEN": self.ray_token,
            "ADVORCH_API_TOKEN": self.api_token,
            "ADVORCH_IMAGE": image,
            "ADVORCH_API_PORT": str(self.api_port),
            "RAY_DASHBOARD_PORT": str(self.dashboard_port),
        }
        # The CLI, as a user on this host runs it against the stack.
        self.cli_env = {
            **os.environ,
            "ADVORCH_PUBLIC_URL": self.api_url,
            "ADVORCH_API_TOKEN": self.api_token,
            "ADVORCH_HOME": str(workdir / "cli-home"),
        }

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client(self) -> AdvorchClient:
        return AdvorchClient(self.api_url, self.api_token)

    def run_compose(self, *args: str, check_rc: bool = True) -> str:
        command = [
            *self.compose,
            "--project-name", PROJECT,
            "--project-directory", str(ROOT),
            "--env-file", str(self.env_file),
            "-f", str(ROOT / "docker-compose.yml"),
            *args,
        ]  # fmt: skip
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, check=False)
        if check_rc and result.returncode != 0:
            raise StepFailed(f"{shlex.join(args)} failed: {result.stderr.strip()[-2000:]}")
        return result.stdout

    def container(self, service: str) -> str:
        container_id = self.run_compose("ps", "-q", service).strip()
        check(bool(container_id), f"no container for {service}")
        return container_id.splitlines()[0]

    def inspect(self, service: str, template: str) -> str:
        return docker("inspect", "-f", template, self.container(service)).strip()

    def advorch(self, *args: str) -> str:
        """The advorch CLI of this venv; StepFailed with its output when it fails."""
        advorch = str(Path(sys.executable).with_name("advorch"))
        result = subprocess.run(
            [advorch, *args], env=self.cli_env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise StepFailed(
                f"advorch {shlex.join(args)} exited {result.returncode}: "
                f"{(result.stdout + result.stderr).strip()[-2000:]}"
            )
        return result.stdout

    def submit(self, spec_file: Path, *overrides: str) -> str:
        sets = [arg for override in overrides for arg in ("--set", override)]
        output = self.advorch("submit", str(spec_file), *sets)
        match = re.search(r"submitted job (\S+)", output)
        check(match is not None, f"no job id in: {output}")
        assert match is not None
        return match[1]

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            for service in ("postgres", "ray-head", "api"):
                if self.inspect(service, "{{.State.Health.Status}}") != "healthy":
                    return False
            # The worker has joined: the head sees two nodes.
            status = subprocess.run(
                ["docker", "exec", self.container("ray-head"), "ray", "status"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            return len(re.findall(r"^\s*1 node_", status, re.MULTILINE)) >= 2

        wait_until("every service healthy and the Ray worker joined", HEALTHY_TIMEOUT_S, healthy)

    def wait_api(self) -> None:
        def answers() -> bool:
            try:
                return httpx.get(f"{self.api_url}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("the API to answer", HEALTHY_TIMEOUT_S, answers)

    def wait_finished(self, job_id: str) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            try:
                with self.client() as client:
                    job = client.job(job_id)
            except Exception:  # the API may be restarting
                return None
            return job if job["status"] in FINISHED else None

        result: dict[str, Any] = wait_until(f"job {job_id} to finish", JOB_TIMEOUT_S, finished)
        return result

    def wait_first_metric(self, job_id: str) -> str:
        """The key of the first trial that has reported an epoch."""

        def first() -> str | None:
            with self.client() as client:
                for trial in client.trials(job_id):
                    if trial["status"] == "running" and client.metrics(job_id, trial["key"]):
                        return str(trial["key"])
            return None

        result: str = wait_until(f"job {job_id}'s first metric", JOB_TIMEOUT_S, first, 1.0)
        return result

    def sigkill(self, service: str) -> str:
        """SIGKILL the service's main process, as a crash would (not ``docker kill``, which
        marks the container stopped by hand, so its restart policy would leave it down)."""
        pid = int(self.inspect(service, "{{.State.Pid}}"))
        try:
            os.kill(pid, signal.SIGKILL)
            return f"SIGKILLed {service}'s main process (pid {pid} on this host)"
        except PermissionError:  # not root: the closest a user of Docker can do
            container = self.container(service)
            docker("kill", "--signal", "KILL", container)
            docker("start", container)
            return f"docker kill -s KILL {service}, then docker start (not root)"


def docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StepFailed(f"docker {shlex.join(args)} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def single_trial_spec(workdir: Path, epochs: int) -> Path:
    """The sweep's spec as one trial of ``epochs`` epochs (beta 6), for the crash steps."""
    spec = yaml.safe_load(SWEEP_SPEC.read_text())
    del spec["sweep"]
    spec["name"] = f"smoke-single-{epochs}-epochs"
    spec["training"]["epochs"] = epochs
    path = workdir / f"single-{epochs}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Smoke:
    """The steps, in order; each one a method that raises StepFailed."""

    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.sweep_id = ""
        self.checkpoint_trial = ""
        self.checkpoint_sha = ""
        self.api_kill_job = ""

    def build_image(self) -> str:
        if self.args.no_build:
            docker("image", "inspect", self.stack.image)
            return f"--no-build: using {self.stack.image}"
        build_args = []
        for name in ("BASE_IMAGE", "TORCH_INDEX_URL"):
            if os.environ.get(name):
                build_args += ["--build-arg", f"{name}={os.environ[name]}"]
        network = ["--network", "host"] if self.args.build_network_host else []
        docker("build", *network, *build_args, "-t", self.stack.image, str(ROOT))
        size = docker("image", "inspect", "-f", "{{.Size}}", self.stack.image).strip()
        return f"{self.stack.image}, {int(size) / 1e9:.2f} GB"

    def bring_up(self) -> str:
        self.stack.run_compose("up", "-d", "--no-build")
        self.stack.wait_healthy()
        return f"API {self.stack.api_url}, dashboard {self.stack.dashboard_url}"

    def sweep(self) -> str:
        job_id = self.stack.submit(SWEEP_SPEC, f"training.epochs={self.args.epochs}")
        self.sweep_id = job_id
        job = self.stack.wait_finished(job_id)
        check(job["status"] == "succeeded", f"sweep {job_id} is {job['status']}: {job['error']}")
        with self.stack.client() as client:
            trials = client.trials(job_id)
            for trial in trials:
                epochs = [m["epoch"] for m in client.metrics(job_id, trial["key"])]
                check(
                    trial["status"] == "succeeded" and len(set(epochs)) == self.args.epochs,
                    f"trial {trial['key']}: {trial['status']}, epochs {epochs}",
                )
        check(len(trials) == 4, f"{len(trials)} trials, expected 4")
        results = self.stack.advorch("results", job_id)
        best = job["best_trial"]
        return (
            f"job {job_id}: 4 trials x {self.args.epochs} epochs succeeded; best {best['key']} "
            f"robust {best['robust_acc']:.3f} ({len(results.splitlines())} lines of results)"
        )

    def web_page(self) -> str:
        response = httpx.get(f"{self.stack.api_url}/", timeout=10)
        check(response.status_code == 200, f"GET / is {response.status_code}")
        check("<html" in response.text.lower(), "GET / is not the page")
        return f"GET / 200, {len(response.content)} bytes"

    def checkpoint(self) -> str:
        check(bool(self.sweep_id), "no sweep to take a checkpoint from")
        with self.stack.client() as client:
            self.checkpoint_trial = client.job(self.sweep_id)["best_trial"]["key"]
        path = self.stack.workdir / "best.pt"
        self.stack.advorch("checkpoint", self.sweep_id, self.checkpoint_trial, "-o", str(path))
        model = load_checkpoint(path)
        self.checkpoint_sha = sha256(path)
        parameters = sum(p.numel() for p in model.parameters())
        return f"{path.stat().st_size} bytes, {type(model).__name__} with {parameters} parameters"

    def dashboard_token(self) -> str:
        url = f"{self.stack.dashboard_url}/api/jobs/"
        without = httpx.get(url, timeout=10)
        check(without.status_code in (401, 403), f"without the token: {without.status_code}")
        with_token = httpx.get(
            url, headers={"Authorization": f"Bearer {self.stack.ray_token}"}, timeout=10
        )
        check(with_token.status_code == 200, f"with the token: {with_token.status_code}")
        return f"without the token {without.status_code}, with it 200"

    def kill_api(self) -> str:
        epochs = self.args.kill_epochs
        job_id = self.stack.submit(single_trial_spec(self.stack.workdir, epochs))
        self.api_kill_job = job_id
        self.stack.wait_first_metric(job_id)
        restarts = int(self.stack.inspect("api", "{{.RestartCount}}"))
        how = self.stack.sigkill("api")
        wait_until(
            "the API container to restart",
            120,
            lambda: (
                int(self.stack.inspect("api", "{{.RestartCount}}")) > restarts
                or self.stack.inspect("api", "{{.State.Status}}") != "running"
            ),
        )
        self.stack.wait_api()
        job = self.stack.wait_finished(job_id)
        with self.stack.client() as client:
            (trial,) = client.trials(job_id)
            epochs_seen = sorted({m["epoch"] for m in client.metrics(job_id, trial["key"])})
        check(job["status"] == "succeeded", f"job {job_id} is {job['status']}: {job['error']}")
        check(len(epochs_seen) == epochs, f"epochs with metrics: {epochs_seen}")
        return f"{how}; job {job_id} succeeded with epochs {epochs_seen}"

    def kill_worker(self) -> str:
        job_id = self.stack.submit(single_trial_spec(self.stack.workdir, self.args.kill_epochs))
        self.stack.wait_first_metric(job_id)
        how = self.stack.sigkill("ray-worker")
        job = self.stack.wait_finished(job_id)
        with self.stack.client() as client:
            trials = client.trials(job_id)
        states = {trial["key"]: trial["status"] for trial in trials}
        seen = f"{how}; job {job_id} {job['status']} ({job['error']}); trials {states}"
        check("running" not in states.values(), f"a trial was left running: {seen}")
        if job["status"] == "succeeded":
            return f"the trial resumed: {seen}"
        error = (job["error"] or "").lower()
        check(
            job["status"] == "failed" and "node" in error,
            f"neither resumed nor failed saying the node was lost: {seen}",
        )
        return seen

    def restart_stack(self) -> str:
        with self.stack.client() as client:
            before = {job["id"]: job["status"] for job in client.list_jobs(limit=100)["items"]}
        self.stack.run_compose("down")  # containers go, volumes stay
        self.stack.run_compose("up", "-d", "--no-build")
        self.stack.wait_healthy()
        with self.stack.client() as client:
            after = {job["id"]: job["status"] for job in client.list_jobs(limit=100)["items"]}
        check(after == before, f"jobs before {before}, after {after}")
        if self.checkpoint_trial:
            path = self.stack.workdir / "best-after-restart.pt"
            self.stack.advorch("checkpoint", self.sweep_id, self.checkpoint_trial, "-o", str(path))
            check(sha256(path) == self.checkpoint_sha, "the checkpoint changed over the restart")
            load_checkpoint(path)
        return f"{len(after)} jobs and the checkpoint still there"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep-going", action="store_true", help="run every step, even after one fails"
    )
    parser.add_argument("--no-build", action="store_true", help="use the image already built")
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the sweep's trials")
    parser.add_argument("--kill-epochs", type=int, default=6, help="epochs of the crash jobs")
    parser.add_argument(
        "--build-network-host",
        action="store_true",
        help="docker build --network host (TORCH_INDEX_URL on this host's loopback)",
    )
    parser.add_argument(
        "--compose",
        default=os.environ.get("COMPOSE"),
        help='the compose command (default: "docker compose" when it works, else docker-compose)',
    )
    parser.add_argument("--image", default="advorch:smoke", help="the image to build and run")
    args = parser.parse_args()

    if args.compose:
        compose = shlex.split(args.compose)
    elif subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        compose = ["docker", "compose"]
    else:
        compose = ["docker-compose"]

    with tempfile.TemporaryDirectory(prefix="advorch-smoke-") as workdir:
        stack = Stack(compose, args.image, Path(workdir))
        smoke = Smoke(stack, args)
        steps: list[tuple[str, Callable[[], str]]] = [
            ("build the image", smoke.build_image),
            ("up and healthy", smoke.bring_up),
            ("TRADES sweep via the CLI", smoke.sweep),
            ("GET / (the web page)", smoke.web_page),
            ("checkpoint download and load", smoke.checkpoint),
            ("Ray dashboard wants the token", smoke.dashboard_token),
            ("SIGKILL the API after the first metric", smoke.kill_api),
            ("SIGKILL the Ray worker mid-trial", smoke.kill_worker),
            ("restart the whole stack", smoke.restart_stack),
        ]
        print(f"compose: {shlex.join(compose)}; project {PROJECT}; image {args.image}", flush=True)
        failed: list[str] = []
        started = time.monotonic()
        try:
            for number, (name, step) in enumerate(steps, 1):
                step_started = time.monotonic()
                try:
                    detail, ok = step(), True
                except (StepFailed, httpx.HTTPError, OSError) as err:
                    detail, ok = f"{type(err).__name__}: {err}", False
                elapsed = time.monotonic() - step_started
                print(
                    f"[{'ok' if ok else 'FAIL'}] {number}. {name}: {elapsed:.1f} s  {detail}",
                    flush=True,
                )
                if not ok:
                    failed.append(name)
                    if not args.keep_going:
                        break
        finally:
            if args.keep:
                print(f"--keep: the stack is still up (project {PROJECT})")
            else:
                down_started = time.monotonic()
                stack.run_compose("down", "-v", "--remove-orphans", check_rc=False)
                print(f"[ok] down -v: {time.monotonic() - down_started:.1f} s", flush=True)
        total = time.monotonic() - started
        if failed:
            print(f"FAILED after {total:.0f} s: {', '.join(failed)}")
            return 1
        print(f"all {len(steps)} steps passed in {total:.0f} s")
        return 0


if __name__ == "__main__":
    sys.exit(main())
