"""The ``advorch`` CLI as users run it, talking to a live server over HTTP, reading the URL and
the token from the same settings and token file as the server (the bootstrap admin), or from
the config file ``advorch login`` writes. Workers are played through the internal routes (the
Ray tests run the real ones).

Most tests run the CLI in this process (``advorch``: ``main()`` as the console script calls
it, with its own stdin, stdout, stderr and environment variables as typer's CliRunner gives
them), since a new Python process costs a third of a second and these tests run a hundred
commands. The whole path, a real ``advorch`` process, is tested too (``advorch_process``)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from service import cli
from service.cli import main
from service.settings import get_settings
from tests.conftest import LiveServer, bearer, finished_autoattack_job, play_workers
from tests.ray_support import run_advorch_process
from workers.models import build_model, load_checkpoint, model_architecture
from workers.spec import ARCH_PATH

ROOT = Path(__file__).resolve().parents[1]
SWEEP_EXAMPLE = ROOT / "examples" / "trades_beta_sweep.yaml"


Advorch = Callable[..., subprocess.CompletedProcess[str]]

# In this process no command has a timeout of its own: a hung `--wait` fails its test here.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cli_config_file(tmp_path: Path) -> Path:
    """Where this test's CLI keeps what `advorch login` writes (never the real user's file)."""
    return tmp_path / "config" / "advorch.toml"


def cli_environment(live_server: LiveServer, cli_config_file: Path) -> dict[str, str | None]:
    """What a user sharing the live server's ADVORCH_HOME (so, until `advorch login`, the
    bootstrap admin) sets; None: unset."""
    return {
        "ADVORCH_HOME": str(live_server.settings.home),
        "ADVORCH_PUBLIC_URL": live_server.url,
        "ADVORCH_CONFIG_FILE": str(cli_config_file),
        "ADVORCH_API_TOKEN": None,
        "COLUMNS": "200",  # tables whole, not folded to 80 columns
    }


@pytest.fixture
def advorch(live_server: LiveServer, cli_config_file: Path) -> Advorch:
    """Run ``advorch ARGS`` against the live server in this process; ``input=`` is its stdin."""
    environment = cli_environment(live_server, cli_config_file)

    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        with (
            CliRunner().isolation(input=input, env=environment) as (stdout, stderr, _),
            # What a new process would do: read the settings and the terminal's width (COLUMNS)
            # from this environment.
            mock.patch.object(cli, "console", Console()),
        ):
            argv, sys.argv = sys.argv, ["advorch", *args]
            excepthook = sys.excepthook  # typer sets its own
            get_settings.cache_clear()
            try:
                main()
                exit_code = 0
            except SystemExit as exit:
                exit_code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            finally:
                sys.argv, sys.excepthook = argv, excepthook
                get_settings.cache_clear()
            sys.stdout.flush()
            sys.stderr.flush()
            out, err = stdout.getvalue().decode(), stderr.getvalue().decode()  # closed after
        return subprocess.CompletedProcess(list(args), exit_code, out, err)

    return run


@pytest.fixture
def advorch_process(live_server: LiveServer, cli_config_file: Path) -> Advorch:
    """Run ``advorch ARGS`` against the live server as a process of its own."""
    overrides = cli_environment(live_server, cli_config_file)
    environment = {k: v for k, v in (os.environ | overrides).items() if v is not None}

    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_advorch_process(environment, *args, input=input)

    return run


def test_submit_with_overrides_then_read_everything_back(
    advorch_process: Advorch,
    api: httpx.Client,
    dispatch: Callable[[str], httpx.Client],
    tmp_path: Path,
) -> None:
    submitted = advorch_process(
        "submit",
        str(SWEEP_EXAMPLE),
        "--set",
        "training.epochs=3",
        "--set",
        "sweep.parameters={training.beta: {grid: [0.0, 6.0]}}",
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted job ")[1].split()[0]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["spec"]["training"]["epochs"] == 3  # the override, YAML-typed
    assert job["num_trials"] == 2

    play_workers(
        dispatch(job_id),
        job_id,
        {"trial_0000": (0.0, 0.97, 0.40), "trial_0001": (6.0, 0.95, 0.80)},
        checkpoints=True,
        ema=frozenset({"trial_0001"}),  # its numbers are of the EMA weights: results say so
    )

    listing = advorch_process("jobs")
    row = next(line for line in listing.stdout.splitlines() if job_id in line)
    assert "succeeded" in row and "80.0% PGD-20" in row
    results = advorch_process("results", job_id)
    assert results.returncode == 0, results.stderr
    best_line = next(line for line in results.stdout.splitlines() if "★" in line)
    assert "trial_0001" in best_line and "beta=6.0" in best_line and "95.0%" in best_line
    assert "(EMA)" in best_line and "of the EMA weights" in results.stdout
    other_line = next(line for line in results.stdout.splitlines() if "trial_0000" in line)
    assert "(EMA)" not in other_line
    status = advorch_process("status", job_id)
    words = " ".join(status.stdout.split())  # the title wraps at the table's width
    assert "trials 2/2 done" in words and "best robust 80.0% PGD-20 (trial_0001)" in words

    plot = tmp_path / "tradeoff.png"
    tradeoff = advorch_process("tradeoff", job_id, "--plot", str(plot))
    assert tradeoff.returncode == 0, tradeoff.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    downloaded = tmp_path / "best.pt"
    assert (
        advorch_process("checkpoint", job_id, "trial_0001", "-o", str(downloaded)).returncode == 0
    )
    model = load_checkpoint(downloaded)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_jobs_and_status_show_autoattacks_accuracy_where_the_job_ran_it(
    advorch: Advorch, submit: Callable[..., dict[str, Any]], dispatch: Callable[[str], httpx.Client]
) -> None:
    # PGD-20 leaves 60%, AutoAttack 52%: only AutoAttack's number may be shown as the robust one.
    job_id = finished_autoattack_job(submit, dispatch, "cli-autoattack")

    listing = advorch("jobs")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if job_id in line)
    assert "52.0% AutoAttack (standard)" in row and "60.0%" not in row
    status = advorch("status", job_id)
    assert status.returncode == 0, status.stderr
    trial_row = next(line for line in status.stdout.splitlines() if "│ trial_0000" in line)
    assert "52.0%" in trial_row and "60.0%" not in trial_row
    words = " ".join(status.stdout.split())  # the title and caption wrap at the table's width
    assert "best robust 52.0% AutoAttack (standard) (trial_0000)" in words
    assert "done: test accuracy (robust: AutoAttack (standard))" in words


def test_results_export_robustbench_entries_of_a_training_and_an_evaluate_job(
    advorch: Advorch,
    api: httpx.Client,
    submit: Callable[..., dict[str, Any]],
    dispatch: Callable[[str], httpx.Client],
    tmp_path: Path,
) -> None:
    trained = submit(
        name="cli-export",
        model={"arch": "preact_resnet18"},
        training={"method": "trades", "epochs": 2},
        evaluation={"autoattack": True},
    )["id"]
    play_workers(
        dispatch(trained), trained, {"trial_0000": (6.0, 0.9, 0.6)}, autoattack={"trial_0000": 0.52}
    )
    # An evaluate job of an uploaded torch.export program: its spec's model.arch is only the
    # default (small_cnn); its worker reports what the file says of its architecture.
    program = torch.export.export(
        build_model("small_cnn", in_channels=1).eval(),
        (torch.rand(2, 1, 8, 8),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    torch.export.save(program, tmp_path / "model.pt2")
    uploaded = api.post(
        "/v1/models",
        params={"filename": "model.pt2"},
        content=(tmp_path / "model.pt2").read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert uploaded.status_code == 201, uploaded.text
    evaluated = submit(
        name="cli-export-evaluate",
        kind="evaluate",
        source={"model": uploaded.json()["id"]},
        evaluation={"epsilons": [0.05, 0.1], "autoattack": True},
    )["id"]
    config = {"source": {"model": uploaded.json()["id"]}}
    trial = {
        "config": {**config, ARCH_PATH: model_architecture(tmp_path / "model.pt2")},
        "status": "succeeded",
        "clean_acc": 0.8,
        "robust_acc": 0.5,
        "autoattack_acc": 0.45,
        "autoattack": {"after_attack": {"clean": 0.8}, "seconds": 1.0, "unreliable": True},
    }
    put = dispatch(evaluated).put(f"/v1/internal/jobs/{evaluated}/trials/trial_0000", json=trial)
    assert put.status_code == 200, put.text

    def exported(job_id: str) -> list[dict[str, Any]]:
        result = advorch("results", job_id, "--format", "robustbench")
        assert result.returncode == 0, result.stderr
        entries: list[dict[str, Any]] = json.loads(result.stdout)
        return entries

    # RobustBench's model_info fields; venue and link are the user's to fill.
    unfilled = {"authors": "", "venue": "", "link": "", "threat_model": "Linf"}
    once = {"additional_data": False, "number_forward_passes": 1}
    assert exported(trained) == [
        {
            "trial": "trial_0000",
            "config": {"training.beta": 6.0},
            "name": "cli-export trial_0000",
            **unfilled,
            "architecture": "preact_resnet18",
            "dataset": "digits",
            "eps": "0.0313725",  # 8/255
            "clean_acc": "90.00",
            "autoattack_acc": "52.00",
            **once,
            "unreliable": False,
        }
    ]
    assert exported(evaluated) == [
        {
            "trial": "trial_0000",
            "config": trial["config"],
            "name": "cli-export-evaluate trial_0000",
            **unfilled,
            "architecture": "unknown (torch.export program)",
            "dataset": "digits",
            "eps": "0.1",  # the curve's largest epsilon: the job's headline
            "clean_acc": "80.00",
            "autoattack_acc": "45.00",
            **once,
            "unreliable": True,
        }
    ]


def test_wait_follows_the_job_to_its_end_and_exits_by_its_outcome(
    advorch: Callable[..., subprocess.CompletedProcess[str]],
    api: httpx.Client,
    dispatch: Callable[[str], httpx.Client],
    tmp_path: Path,
) -> None:
    spec = yaml.safe_load(SWEEP_EXAMPLE.read_text())
    spec["name"] = "cli-wait"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))

    def play_the_workers() -> None:
        job_id = _wait_for_queued_job(api, "cli-wait")
        results = {
            f"trial_000{i}": (beta, 0.9, 0.5 + i / 10)
            for i, beta in enumerate([0.0, 1.0, 3.0, 6.0])
        }
        play_workers(dispatch(job_id), job_id, results, checkpoints=True)

    workers = threading.Thread(target=play_the_workers)
    workers.start()
    waited = advorch("submit", str(spec_file), "--wait")
    workers.join()
    assert waited.returncode == 0, waited.stderr
    assert "(succeeded)" in waited.stdout and "trials 4/4 done" in waited.stdout


def test_a_failed_job_makes_wait_exit_non_zero(
    advorch: Callable[..., subprocess.CompletedProcess[str]],
    submit: Callable[..., dict[str, Any]],
    dispatch: Callable[[str], httpx.Client],
) -> None:
    job_id = submit(name="to-fail")["id"]
    dispatch(job_id).post(
        f"/v1/internal/jobs/{job_id}/events",
        json={"status": "failed", "reason": "r", "error": "out of memory"},
    )
    watched = advorch("status", job_id, "--watch")
    assert watched.returncode == 1
    assert "out of memory" in watched.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("status", "no-such-job"), "no job 'no-such-job'"),
        (("submit", str(SWEEP_EXAMPLE), "--set", "training.epsilon=3"), "training.epsilon"),
        (("logs", "no-such-job"), "no job 'no-such-job'"),
    ],
)
def test_api_errors_are_one_line_and_exit_non_zero(
    advorch: Callable[..., subprocess.CompletedProcess[str]], args: tuple[str, ...], message: str
) -> None:
    result = advorch(*args)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_logs_need_a_ray_cluster(
    advorch: Callable[..., subprocess.CompletedProcess[str]], submit: Callable[..., dict[str, Any]]
) -> None:
    # This API server was given no Ray cluster: it says so rather than guessing.
    result = advorch("logs", submit(name="no-ray")["id"])
    assert result.returncode == 1
    assert "ADVORCH_RAY_ADDRESS" in result.stderr


def _wait_for_queued_job(api: httpx.Client, name: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job in api.get("/v1/jobs", params={"status": "queued"}).json()["items"]:
            if job["name"] == name:
                return str(job["id"])
        time.sleep(0.1)
    raise AssertionError(f"no queued job {name!r} appeared")


# --- users, tokens, login ---


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n").splitlines()[-1]


def test_an_admin_adds_a_user_who_logs_in_and_sees_their_own_jobs(
    advorch: Advorch,
    api: httpx.Client,
    submit: Callable[..., dict[str, Any]],
    cli_config_file: Path,
    live_server: LiveServer,
) -> None:
    admins_job = submit(name="admins-job")["id"]
    name = f"carol-{uuid.uuid4().hex[:6]}"
    token = last_line(advorch("users", "add", name))
    assert api.get("/v1/me", headers=bearer(token)).json()["name"] == name  # alone on its line
    second = last_line(advorch("users", "token", name))
    assert second != token and api.get("/v1/me", headers=bearer(second)).status_code == 200

    # A wrong token is refused, and nothing is written.
    refused = advorch("login", input="not-a-token\n")
    assert refused.returncode == 1 and "unknown, revoked" in refused.stderr
    assert not cli_config_file.exists()
    logged_in = advorch("login", "--url", live_server.url, input=token + "\n")
    assert logged_in.returncode == 0, logged_in.stderr
    assert f"as {name}" in logged_in.stdout and token not in logged_in.stdout
    assert stat.S_IMODE(cli_config_file.stat().st_mode) == 0o600
    assert tomllib.loads(cli_config_file.read_text()) == {"url": live_server.url, "token": token}

    # From now on the CLI is carol (the config file comes before $ADVORCH_HOME/api_token).
    assert f"{name} (token " in advorch("whoami").stdout
    submitted = advorch("submit", str(SWEEP_EXAMPLE), "--set", "name=carols-sweep")
    assert submitted.returncode == 0, submitted.stderr
    carols_job = submitted.stdout.split("submitted job ")[1].split()[0]
    listing = advorch("jobs").stdout
    assert carols_job in listing and name in listing and admins_job not in listing
    assert "1 of 1 jobs" in listing
    assert advorch("status", admins_job).returncode == 1  # not carol's: no such job
    not_admin = advorch("users", "list")
    assert not_admin.returncode == 1 and not_admin.stderr.startswith("error: only admins")

    assert advorch("logout").returncode == 0 and not cli_config_file.exists()
    assert "admin (admin)" in advorch("whoami").stdout
    # A config file that was there already, readable by others, is made private by a login.
    cli_config_file.write_text('token = "stale"\n')
    cli_config_file.chmod(0o644)
    assert advorch("login", "--token", second).returncode == 0
    assert stat.S_IMODE(cli_config_file.stat().st_mode) == 0o600
    assert f"{name} (token " in advorch("whoami").stdout
    advorch("logout")
    everyone = advorch("jobs", "--limit", "100").stdout
    assert carols_job in everyone and admins_job in everyone and " admin " in everyone
    assert carols_job in advorch("jobs", "--owner", name).stdout
    assert admins_job not in advorch("jobs", "--owner", name).stdout


def test_an_admin_manages_users_from_the_cli(advorch: Advorch, api: httpx.Client) -> None:
    name = f"dave-{uuid.uuid4().hex[:6]}"
    token = last_line(advorch("users", "add", name, "--admin"))
    assert api.get("/v1/me", headers=bearer(token)).json()["admin"] is True
    token_id = token.split("_")[1]

    limited = advorch("users", "limits", name, "--max-active-jobs", "3")
    assert limited.returncode == 0 and "at most 3 queued or running jobs" in limited.stdout
    listing = advorch("users", "list").stdout
    row = next(line for line in listing.splitlines() if name in line)
    assert "yes" in row and token_id in row and "3*" in row
    admin_row = next(line for line in listing.splitlines() if line.split()[1:2] == ["admin"])
    assert "yes" in admin_row and "*" not in admin_row
    assert "default" in advorch("users", "limits", name, "--max-active-jobs", "x").stderr

    revoked = advorch("users", "revoke", name, token_id)
    assert revoked.returncode == 0, revoked.stderr
    assert api.get("/v1/me", headers=bearer(token)).status_code == 401
    fresh = last_line(advorch("users", "token", name))
    assert advorch("users", "disable", name).returncode == 0
    assert api.get("/v1/me", headers=bearer(fresh)).status_code == 401
    assert "disabled" in advorch("users", "token", name).stderr

    audit = advorch("audit", "--action", "user.disable").stdout
    assert name in audit and "user.disable" in audit


@contextmanager
def one_answer_server(answer: bytes) -> Iterator[str]:
    """An HTTP server that gives every request ``answer``, as raw bytes, then hangs up: how a
    download breaks off or arrives damaged (a network edge the real service cannot be made to
    fail at on demand). Yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.recv(65536)
                connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        listener.close()


def checkpoint_answer(body: bytes, *, length: int, sha256_of: bytes) -> bytes:
    headers = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\nX-Content-SHA256: {hashlib.sha256(sha256_of).hexdigest()}"
        "\r\nConnection: close\r\n\r\n"
    )
    return headers.encode() + body


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (
            checkpoint_answer(b"w" * 100, length=1000, sha256_of=b"w" * 1000),
            "error: the download of job-1/trial_0000 broke off: ",
        ),
        (
            checkpoint_answer(b"w" * 100, length=100, sha256_of=b"v" * 100),
            "error: the checkpoint arrived damaged (SHA-256 ",
        ),
    ],
    ids=["cut-off", "damaged"],
)
def test_a_broken_checkpoint_download_leaves_no_file_and_says_why_in_one_line(
    answer: bytes, says: str, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "best.pt"
    output.parent.mkdir()
    output.write_bytes(b"the checkpoint downloaded before")
    with one_answer_server(answer) as url:
        env = {
            **os.environ,
            "ADVORCH_HOME": str(tmp_path / "home"),
            "ADVORCH_PUBLIC_URL": url,
            "ADVORCH_API_TOKEN": "a-token",
            "ADVORCH_CONFIG_FILE": str(tmp_path / "advorch.toml"),
            "COLUMNS": "300",
        }
        args = ("checkpoint", "job-1", "trial_0000", "-o", str(output))
        result = run_advorch_process(env, *args, timeout_s=60)
    assert result.returncode == 1
    assert result.stderr.startswith(says) and len(result.stderr.splitlines()) == 1, result.stderr
    # Neither a truncated file nor the draft it was written to; what was there is kept.
    assert [p.name for p in output.parent.iterdir()] == ["best.pt"]
    assert output.read_bytes() == b"the checkpoint downloaded before"
