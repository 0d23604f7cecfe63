"""Shared fixtures. The API tests talk real HTTP to a live server (uvicorn in a thread) on each
database backend: SQLite in a temporary folder, and PostgreSQL at 127.0.0.1:5432 in a database
made for this session and dropped after it. When PostgreSQL is down its tests fail, not skip:
``.ci/run`` starts it.

``api`` is the bootstrap admin (the server's own token); ``make_user`` makes other users, each
with a name of its own, since the live server is shared by the whole session.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from sqlalchemy import create_engine, text

from api.main import create_app
from service import jobs
from service.auth import worker_token
from service.db import make_engine, make_session_factory
from service.ray_cluster import LocalRayHead, RayJobs, start_local_head
from service.settings import Settings
from tests.ray_support import Service, clean_environment
from workers.models import build_model, save_checkpoint

POSTGRES_ADMIN_URL = os.environ.get(
    "ADVORCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]

# The live servers' limits: small, so the tests can go over them cheaply.
TEST_LIMITS: dict[str, Any] = {
    "max_epochs": 50,
    "max_trials": 16,
    "max_workers": 4,
    "max_batch_size": 512,
    "max_request_bytes": 64_000,
    "max_upload_bytes": 2_000_000,
    # The bootstrap admin submits many jobs over a session and never finishes most of them.
    "user_max_active_jobs": 10_000,
}


@pytest.fixture(scope="session")
def make_database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """Make an empty database on a backend ("sqlite" or "postgres") and give its URL. The
    PostgreSQL ones are dropped at the end of the session, so runs never collide; ``encoding``
    makes one in another encoding than the server's (``"SQL_ASCII"``)."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make(backend: str, encoding: str | None = None) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'advorch.db'}"
        name = f"advorch_test_{uuid.uuid4().hex[:12]}"
        # template0: the only template a database may change its encoding from.
        options = f" ENCODING '{encoding}' TEMPLATE template0" if encoding else ""
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"{options}'))
        made.append(name)
        return admin.url.set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as connection:
        for name in made:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def empty_database_url(
    request: pytest.FixtureRequest, make_database_url: Callable[[str], str]
) -> str:
    """An empty database on each backend, for tests that make the schema themselves."""
    return make_database_url(request.param)


@dataclass
class LiveServer:
    url: str
    settings: Settings

    @property
    def api_token(self) -> str:
        """Read as the CLI reads it: from $ADVORCH_HOME/api_token."""
        return self.settings.api_token_file.read_text().strip()


@contextmanager
def serve(settings: Settings) -> Iterator[LiveServer]:
    """``create_app(settings)`` served by uvicorn on a free port, until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    config = uvicorn.Config(create_app(settings), lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server did not start; its log is above")
        time.sleep(0.02)
    try:
        yield LiveServer(url=f"http://{host}:{port}", settings=settings)
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def server_settings(home: Path, database_url: str, **overrides: Any) -> Settings:
    """The settings of a test server: its own home and database, the test limits."""
    return Settings(
        home=home,
        database_url=database_url,
        api_token=None,
        secret_key=None,
        config_file=home / "cli-config.toml",
        **(TEST_LIMITS | overrides),
    )


@pytest.fixture(scope="session", params=BACKENDS)
def live_server(
    request: pytest.FixtureRequest,
    make_database_url: Callable[[str], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """The live server of the session, one per backend."""
    home = tmp_path_factory.mktemp(f"home-{request.param}")
    with serve(server_settings(home, make_database_url(request.param))) as server:
        yield server


@pytest.fixture(params=BACKENDS)
def fresh_server(
    request: pytest.FixtureRequest,
    make_database_url: Callable[[str], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """A live server of its own, on an empty database, for a test that needs to know every job
    and user there is (the dispatcher's order, the last admin)."""
    home = tmp_path_factory.mktemp(f"fresh-home-{request.param}")
    with serve(server_settings(home, make_database_url(request.param))) as server:
        yield server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def api(live_server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client of the live server with the bootstrap admin's API token."""
    with httpx.Client(base_url=live_server.url, headers=bearer(live_server.api_token)) as client:
        yield client


@dataclass
class UserClient:
    """A user made through the admin routes, and an HTTP client holding their first token."""

    name: str
    token: str
    token_id: str
    http: httpx.Client


def new_user(admin_client: httpx.Client, prefix: str, *, admin: bool = False) -> UserClient:
    """Create a user named ``prefix-<random>`` through ``admin_client`` (an admin's)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    response = admin_client.post("/v1/users", json={"name": name, "admin": admin})
    assert response.status_code == 201, response.text
    token = response.json()["token"]
    http = httpx.Client(base_url=str(admin_client.base_url), headers=bearer(token["token"]))
    return UserClient(name=name, token=token["token"], token_id=token["id"], http=http)


@pytest.fixture
def make_user(api: httpx.Client) -> Iterator[Callable[..., UserClient]]:
    """Make users of the live server: ``make_user("alice")``, ``make_user("ops", admin=True)``."""
    made: list[UserClient] = []

    def make(prefix: str, *, admin: bool = False) -> UserClient:
        made.append(new_user(api, prefix, admin=admin))
        return made[-1]

    yield make
    for user in made:
        user.http.close()


@pytest.fixture
def submit(api: httpx.Client) -> Callable[..., dict[str, Any]]:
    """Submit a job spec (a small valid one, with ``spec`` merged over it) and return the job."""

    def submit_job(**spec: Any) -> dict[str, Any]:
        response = api.post("/v1/jobs", json={"name": "test-job", **spec})
        assert response.status_code == 201, response.text
        job: dict[str, Any] = response.json()
        return job

    return submit_job


@pytest.fixture
def worker(live_server: LiveServer) -> Iterator[Callable[[str], httpx.Client]]:
    """An HTTP client holding a job's worker token, as that job's workers hold it."""
    clients: list[httpx.Client] = []

    def client_for(job_id: str) -> httpx.Client:
        token = worker_token(live_server.settings, job_id)
        headers = {"Authorization": f"Bearer {token}"}
        clients.append(httpx.Client(base_url=live_server.url, headers=headers))
        return clients[-1]

    yield client_for
    for client in clients:
        client.close()


@pytest.fixture
def dispatch(
    live_server: LiveServer, worker: Callable[[str], httpx.Client]
) -> Iterator[Callable[[str], httpx.Client]]:
    """Play the dispatcher (a later issue) as it does: mark a queued job submitted to Ray, and
    hand the job's worker token to its workers (here: an HTTP client holding it)."""
    engine = make_engine(live_server.settings.resolved_database_url)
    session_factory = make_session_factory(engine)

    def dispatch_job(job_id: str) -> httpx.Client:
        with session_factory() as session:
            jobs.mark_submitted(
                session,
                jobs.get_job(session, job_id),
                ray_submission_id=f"advorch-{job_id}",
                dashboard_url=f"http://127.0.0.1:8265/#/jobs/advorch-{job_id}",
            )
        return worker(job_id)

    yield dispatch_job
    engine.dispose()


@pytest.fixture
def tiny_cifar10_root(tmp_path: Path) -> Path:
    """A data folder holding ``cifar-10-batches-py`` in the standard python format, as
    ``load_dataset("cifar10", split, root)`` reads it: five training batches of 20 images and
    a test batch of 10; image ``i`` of a batch has label ``i % 10`` and pixels
    ``(i + c + h + w) % 256``."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    files = {f"data_batch_{i}": 20 for i in range(1, 6)} | {"test_batch": 10}
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    for name, size in files.items():
        images = np.stack([(i + c + h + w) % 256 for i in range(size)]).astype(np.uint8)
        batch = {b"data": images.reshape(size, 3072), b"labels": [i % 10 for i in range(size)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return tmp_path


def play_workers(
    worker: httpx.Client,
    job_id: str,
    results: dict[str, tuple[float, float, float]],
    *,
    epochs: int = 2,
    checkpoints: bool = False,
    ema: frozenset[str] = frozenset(),
    autoattack: dict[str, float] | None = None,
) -> None:
    """Post what a job's workers post, through the internal routes: running; for each trial
    ``key -> (beta, clean acc, robust acc)`` its epochs' validation accuracies rising to those
    numbers (with ``checkpoints``, a real small_cnn checkpoint uploaded for the last, best,
    epoch), its results (of the EMA weights for the keys in ``ema``; with AutoAttack's
    accuracy for the keys in ``autoattack``, for a job that runs it); then succeeded. Every
    post must be taken."""

    def expect_ok(response: httpx.Response) -> None:
        assert response.status_code == 200, response.text

    base = f"/v1/internal/jobs/{job_id}"
    expect_ok(worker.post(f"{base}/events", json={"status": "running", "reason": "up"}))
    for key, (beta, clean, robust) in results.items():
        for epoch in range(1, epochs + 1):
            behind = (epochs - epoch) / 10
            metrics = {
                "epoch": epoch,
                "val_clean_acc": clean - behind,
                "val_robust_acc": robust - behind,
            }
            expect_ok(worker.post(f"{base}/trials/{key}/metrics", json=metrics))
        if checkpoints:
            expect_ok(upload_checkpoint(worker, job_id, key, epoch=epochs))
        trial = {
            "config": {"training.beta": beta},
            "status": "succeeded",
            "clean_acc": clean,
            "robust_acc": robust,
            "best_epoch": epochs,
            "val_clean_acc": clean,
            "val_robust_acc": robust,
        }
        if key in ema:
            trial["weights"] = "ema"
        if autoattack is not None and key in autoattack:
            trial["autoattack_acc"] = autoattack[key]
        expect_ok(worker.put(f"{base}/trials/{key}", json=trial))
    expect_ok(worker.post(f"{base}/events", json={"status": "succeeded", "reason": "done"}))


def finished_autoattack_job(
    submit: Callable[..., dict[str, Any]], dispatch: Callable[[str], httpx.Client], name: str
) -> str:
    """A one-trial TRADES job that runs AutoAttack, played to its end by its workers; its id.
    PGD-20 leaves 60% and AutoAttack 52%: only AutoAttack's number may be shown as the robust
    one."""
    job_id: str = submit(
        name=name, training={"method": "trades", "epochs": 2}, evaluation={"autoattack": True}
    )["id"]
    play_workers(
        dispatch(job_id), job_id, {"trial_0000": (6.0, 0.9, 0.6)}, autoattack={"trial_0000": 0.52}
    )
    return job_id


def checkpoint_bytes(seed: int = 0) -> bytes:
    """A real small_cnn checkpoint for 1x8x8 digits, as a file's bytes."""
    torch.manual_seed(seed)
    meta = {"arch": "small_cnn", "num_classes": 10, "input_shape": (1, 8, 8)}
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(
            Path(folder) / "best.pt", build_model("small_cnn", in_channels=1), meta
        )
        return path.read_bytes()


def upload_checkpoint(
    worker: httpx.Client, job_id: str, key: str, *, epoch: int, content: bytes | None = None
) -> httpx.Response:
    """Upload a trial's best checkpoint as its rank 0 does: streamed, with its SHA-256."""
    content = checkpoint_bytes() if content is None else content
    return worker.put(
        f"/v1/internal/jobs/{job_id}/trials/{key}/checkpoint",
        params={"epoch": epoch},
        content=content,
        headers={"X-Content-SHA256": hashlib.sha256(content).hexdigest()},
    )


# --- one Ray cluster for the whole session, and advorch services on it ---


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the Makefile's two workers on two cores, one of them running the Ray
    tests' trials too), torch computes on one thread per worker: with a thread per core in
    each, they spun against each other, and the digits runs took 86 s instead of 12 s."""
    if hasattr(config, "workerinput"):
        torch.set_num_threads(1)


def pytest_itemcollected(item: pytest.Item) -> None:
    """Every Ray test in one pytest-xdist group: one worker runs them all, on one cluster."""
    if item.get_closest_marker("ray") is not None:
        item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.hookimpl(trylast=True)  # after pytest's own reordering (by session fixture parameter)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Ray tests last: the session's cluster starts with the first of them and stays up to
    the end, so a test after them would share the cores with its idle daemons (a tenth of a
    core here). (Under pytest-xdist, as the Makefile runs them, the Ray tests are one group, the
    largest, which one worker takes first while the other runs the rest.) The slow Ray tests,
    which kill processes and nodes on timers, last of all: by then the other worker is done."""
    items.sort(
        key=lambda item: (
            item.get_closest_marker("ray") is not None,
            item.get_closest_marker("slow") is not None,
        )
    )


def claim_the_cluster(worker: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under pytest-xdist the workers' temporary folders share a parent: the first worker to
    start a cluster claims it there, and another one fails, loudly, rather than start a second
    cluster on the same cores (which pytest-xdist's loadgroup exists to prevent)."""
    claim = tmp_path_factory.getbasetemp().parent / "ray-head-worker"
    try:
        with claim.open("x") as file:
            file.write(f"{worker} {os.getpid()}")
        return
    except FileExistsError:
        owner, pid = claim.read_text().split()
    if owner == worker:
        return
    if not Path(f"/proc/{pid}").exists():
        pytest.fail(f"{owner}, which ran the Ray tests, exited; its Ray processes may be left")
    pytest.fail(
        f"the Ray tests run on two pytest-xdist workers ({owner} already started a cluster): "
        "run them with --dist loadgroup, on a pytest that keeps it (below 9.2)"
    )


@pytest.fixture(scope="session")
def ray_head(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalRayHead]:
    if hasattr(request.config, "workerinput"):
        claim_the_cluster(request.config.workerinput["workerid"], tmp_path_factory)
    head = start_local_head(Settings(home=tmp_path_factory.mktemp("ray-head")))
    yield head
    head.stop()


@pytest.fixture(scope="session")
def ray_jobs(ray_head: LocalRayHead) -> RayJobs:
    return RayJobs(ray_head.dashboard_url, ray_head.auth_token)


def start_service(ray_head: LocalRayHead, home: Path, **settings: str) -> Service:
    """``advorch serve`` on the session's cluster, with its home, reconciling every 2 s."""
    env = clean_environment() | {
        "ADVORCH_RAY_ADDRESS": ray_head.dashboard_url,
        "RAY_AUTH_TOKEN": ray_head.auth_token,  # the cluster's token, as Ray's clients take it
        "ADVORCH_DATA_DIR": str(home / "data"),  # empty: there is no CIFAR-10 here
        "ADVORCH_RECONCILE_INTERVAL_S": "2",
        "ADVORCH_DISPATCH_INTERVAL_S": "0.5",
        **settings,
    }
    service = Service(home=home, env=env)
    service.start()
    return service


@pytest.fixture(scope="session")
def service(ray_head: LocalRayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The embedded default's service (SQLite) on the session's cluster."""
    service = start_service(ray_head, tmp_path_factory.mktemp("advorch-home"))
    yield service
    service.stop_if_running()


@pytest.fixture(scope="session")
def postgres_service(
    ray_head: LocalRayHead,
    tmp_path_factory: pytest.TempPathFactory,
    make_database_url: Callable[[str], str],
) -> Iterator[Service]:
    """A service on PostgreSQL (a database of its own) on the same cluster."""
    url = make_database_url("postgres")
    service = start_service(
        ray_head, tmp_path_factory.mktemp("advorch-home-pg"), ADVORCH_DATABASE_URL=url
    )
    yield service
    service.stop_if_running()


@pytest.fixture(scope="session")
def ray_api(service: Service) -> Iterator[httpx.Client]:
    """An HTTP client of the SQLite service, with its admin's token."""
    with service.client() as client:
        yield client
