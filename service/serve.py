"""``advorch serve``: the whole service in one process.

    1. bring the database to the newest schema, and make sure of the bootstrap admin
    2. start a local Ray head, unless ADVORCH_RAY_ADDRESS names a cluster to use
    3. run the reconciler and the dispatcher, each in a background thread
    4. serve the API in ADVORCH_API_WORKERS uvicorn processes (service.api_workers), until
       Ctrl-C or SIGTERM

Steps 1 to 3 happen once, in this process, however many API workers there are. Then it stops,
in reverse, everything it started, the Ray head and the workers included: no process is left
behind. (Even a SIGKILL leaves none: the Ray head and the workers are told to stop when this
process dies.)
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from service.api_workers import RayAccess, Workers, bind_socket
from service.auth import ensure_api_token
from service.db import engine_from_settings, make_session_factory, upgrade_database
from service.dispatcher import dispatch
from service.ray_cluster import (
    LocalRayHead,
    RayJobs,
    cluster_auth_token,
    cluster_auth_token_source,
    start_local_head,
)
from service.reconciler import reconcile
from service.settings import Settings
from service.storage import check_storage_uri, warn_if_local_on_a_cluster
from service.users import ensure_bootstrap_admin

log = logging.getLogger(__name__)

THREAD_JOIN_TIMEOUT_S = 10.0


def serve(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Stop by unwinding, so that the cleanup below runs on SIGTERM as on Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.signal(signal.SIGINT, _raise_system_exit)
    settings.home.mkdir(parents=True, exist_ok=True)
    storage_uri = check_storage_uri(settings.resolved_storage_uri)
    upgrade_database(settings.resolved_database_url, settings.db_connect_timeout_s)
    engine = engine_from_settings(settings)
    session_factory = make_session_factory(engine)
    with session_factory() as session:
        ensure_bootstrap_admin(session, ensure_api_token(settings))
    # Bound before anything starts: a port in use fails here, once.
    sock = bind_socket(settings.host, settings.port)

    head: LocalRayHead | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    workers: Workers | None = None
    try:
        if settings.ray_address is None:
            log.info("starting a local Ray head (log: %s)", settings.home / "ray-head.log")
            head = start_local_head(settings)
            ray = RayAccess(head.dashboard_url, head.auth_token)
            ray_token = f"in {head.token_file}"
        else:
            ray = RayAccess(settings.ray_address, cluster_auth_token())
            ray_token = cluster_auth_token_source()
        ray_jobs = RayJobs(ray.address, ray.auth_token)
        if head is None:
            warn_if_local_on_a_cluster(storage_uri, ray_jobs.alive_nodes() or 1)
        threads = [
            _every(
                settings.reconcile_interval_s,
                stop,
                "reconciler",
                lambda: reconcile(session_factory, ray_jobs),
            ),
            _every(
                settings.dispatch_interval_s,
                stop,
                "dispatcher",
                lambda: dispatch(session_factory, ray_jobs, settings),
            ),
        ]
        workers = Workers(settings, ray, sock)
        workers.start()
        print(_banner(settings, ray_jobs, ray_token), flush=True)
        workers.supervise()
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave Ray running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if workers is not None:
            workers.stop()
        sock.close()
        stop.set()
        for thread in threads:
            thread.join(THREAD_JOIN_TIMEOUT_S)
        engine.dispose()
        if head is not None:
            log.info("stopping the local Ray head")
            head.stop()


def _every(
    interval_s: float, stop: threading.Event, name: str, work: Callable[[], None]
) -> threading.Thread:
    """Run ``work`` now and then every ``interval_s`` in a thread, until ``stop`` is set. A
    round that fails is logged and the next one tries again (Ray or the database may be
    away for a while)."""

    def loop() -> None:
        while not stop.is_set():
            try:
                work()
            except OSError as err:  # Ray cannot be reached (yet): no traceback every second
                log.warning("%s: %s; trying again in %.0f s", name, err, interval_s)
            except Exception:
                log.exception("%s: the round failed; trying again in %.0f s", name, interval_s)
            stop.wait(interval_s)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def _banner(settings: Settings, ray_jobs: RayJobs, ray_token: str) -> str:
    """What `advorch serve` prints once it is up: where the API and the Ray dashboard are, and
    where the token each asks for is (the dashboard shows nothing without Ray's)."""
    api_url = f"http://{settings.host}:{settings.port}"
    plural = "es" if settings.api_workers > 1 else ""
    processes = f"{settings.api_workers} worker process{plural}"
    token = (
        "ADVORCH_API_TOKEN"
        if settings.api_token is not None
        else f"in {settings.api_token_file} (the admin's: Authorization: Bearer <token>)"
    )
    return (
        f"advorch is serving\n"
        f"  API:           {api_url}  (docs at {api_url}/docs; {processes})\n"
        f"  Ray dashboard: {ray_jobs.address}  (its token: {ray_token})\n"
        f"  API token:     {token}"
    )


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
