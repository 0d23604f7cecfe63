"""The API's worker processes under ``advorch serve``: ``ADVORCH_API_WORKERS`` uvicorn servers
sharing one listening socket, which the parent binds (so a port in use fails once, at start,
and the kernel hands each connection to whichever worker accepts first).

The parent does everything that must happen once: migrations, the bootstrap admin, the Ray
head, the dispatcher and the reconciler. Workers only serve HTTP. A worker never outlives the
parent: it asks the kernel for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), even by
SIGKILL, and exits at once if the parent is already gone by then. A worker that dies while the
service runs is started again; one that dies within seconds of its start stops the service
(it would only die again).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import uvicorn

from service.settings import Settings

log = logging.getLogger(__name__)

# A worker that exits sooner than this after its start is broken, not unlucky.
MIN_WORKER_UPTIME_S = 10.0
WORKER_STOP_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 2048
BIND_RETRY_S = 10.0
# Where `advorch serve`'s processes keep their Prometheus counters, so that /metrics (served
# by any worker) sums every process's: prometheus_client's multiprocess mode.
PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class RayAccess:
    """What a worker needs to reach the Ray cluster (the logs route): its Jobs API and token."""

    address: str
    auth_token: str | None


def prepare_prometheus_dir(settings: Settings) -> None:
    """Put this process (and the workers it starts) in prometheus_client's multiprocess mode,
    in an emptied folder under home: counts of an earlier run must not be added to this one's.
    Must run before prometheus_client is imported, which decides the mode at import."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set")
    folder = settings.home / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    os.environ[PROMETHEUS_DIR_ENV] = str(folder)


def bind_socket(host: str, port: int) -> socket.socket:
    """The API's listening socket. A port still held is tried again for a few seconds: the
    workers of a service killed a moment ago close theirs as they exit (PR_SET_PDEATHSIG)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            break
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


class Workers:
    """The running workers; ``supervise()`` blocks, ``stop()`` ends them all."""

    def __init__(self, settings: Settings, ray: RayAccess | None, sock: socket.socket) -> None:
        self._settings = settings
        self._ray = ray
        self._sock = sock
        # spawn, not fork: the parent runs threads (the dispatcher, the reconciler).
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[tuple[BaseProcess, float]] = []

    def start(self) -> None:
        self._processes = [self._start_one(i) for i in range(self._settings.api_workers)]

    def _start_one(self, index: int) -> tuple[BaseProcess, float]:
        process = self._context.Process(
            target=run_worker,
            args=(self._settings, self._ray, self._sock, os.getpid()),
            name=f"advorch-api-{index}",
            daemon=True,
        )
        process.start()
        return process, time.monotonic()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._processes if process.pid is not None]

    def supervise(self) -> None:
        """Wait on the workers, starting again each that exits; raises RuntimeError when one
        exits right after its start."""
        while True:
            wait([process.sentinel for process, _ in self._processes])
            for index, (process, started) in enumerate(self._processes):
                if process.is_alive():
                    continue
                uptime = time.monotonic() - started
                if uptime < MIN_WORKER_UPTIME_S:
                    raise RuntimeError(
                        f"API worker {process.name} exited with code {process.exitcode} "
                        f"{uptime:.1f} s after its start; its log is above"
                    )
                log.warning(
                    "API worker %s (pid %s) exited with code %s; starting it again",
                    process.name,
                    process.pid,
                    process.exitcode,
                )
                self._forget(process)
                self._processes[index] = self._start_one(index)

    def stop(self) -> None:
        """SIGTERM every worker (uvicorn finishes the requests in flight), then SIGKILL those
        still there after WORKER_STOP_TIMEOUT_S."""
        for process, _ in self._processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for process, _ in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            self._forget(process)

    @staticmethod
    def _forget(process: BaseProcess) -> None:
        if PROMETHEUS_DIR_ENV in os.environ and process.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid)


def run_worker(
    settings: Settings, ray: RayAccess | None, sock: socket.socket, parent_pid: int
) -> None:
    """A worker process: serve the API on ``sock`` until SIGTERM (or the parent's death)."""
    _exit_with_parent(parent_pid)
    # As the parent logs (a spawned process starts with logging unconfigured).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from api.main import create_app  # imported here: the parent serves no HTTP

    ray_jobs = None
    if ray is not None:
        from service.ray_cluster import RayJobs

        ray_jobs = RayJobs(ray.address, ray.auth_token)
    app = create_app(settings, ray_jobs, prepare_database=False)
    config = uvicorn.Config(
        app,
        lifespan="on",
        access_log=settings.access_log,
        # uvloop and httptools where installed (uvicorn[standard]): measured in
        # docs/benchmarks.md.
        loop="auto",
        http="auto",
    )
    # What start-up made (modules, routes, models) lives as long as the process: out of the
    # garbage collector's sight, its collections stay short.
    gc.freeze()
    uvicorn.Server(config).run(sockets=[sock])


def _exit_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies (Linux), and exit now if it already has."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:
        with contextlib.suppress(Exception):
            log.warning("the service exited before this API worker started; exiting")
        os._exit(0)
