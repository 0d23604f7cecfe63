"""What ``advorch serve`` sets up before anything runs, without a Ray cluster: the storage URI
checks, the environment of the local Ray head and of jobs (ADVORCH_PASS_ENV), the banner, and
Tune's callbacks: where they find the worker token, and when they give up on a lost node.
(tests/test_ray_jobs.py runs `advorch serve` with a real head, tests/test_ray_nodes.py nodes.)"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from ray import cloudpickle
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.experiment import Trial

from service.ray_cluster import RayJobs, head_environment
from service.serve import _banner
from service.settings import Settings
from service.storage import StorageMisconfigured, check_storage_uri, warn_if_local_on_a_cluster
from workers.job_env import JobEnv
from workers.sweep import FailWhereNoNodeFits, NodeLost, ReportStoppedTrials

ROOT = Path(__file__).resolve().parents[1]

# --- ADVORCH_STORAGE_URI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("relative/checkpoints", "is a relative path"),
        ("./checkpoints", "is a relative path"),
        ("gs://bucket/prefix", "no filesystem for gs:// is installed"),  # gcsfs is not here
        ("nosuchfs://bucket/prefix", "no filesystem for nosuchfs:// is installed"),
    ],
)
def test_storage_uris_ray_cannot_use_are_refused_in_one_line(uri: str, says: str) -> None:
    with pytest.raises(StorageMisconfigured) as refused:
        check_storage_uri(uri)
    message = str(refused.value)
    assert says in message and uri in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "uri", ["/srv/advorch/storage", "file:///srv/advorch/storage", "s3://bucket/prefix"]
)
def test_storage_uris_ray_can_use_are_taken_as_they_are(uri: str) -> None:
    assert check_storage_uri(uri) == uri


@pytest.mark.parametrize(
    ("uri", "says"),
    [("relative/checkpoints", "is a relative path"), ("nosuchfs://b/p", "nosuchfs://")],
)
def test_serve_stops_on_a_bad_storage_uri_with_one_line(
    uri: str, says: str, tmp_path: Path
) -> None:
    """`advorch serve` itself: exit 1, one line on stderr, no traceback, and nothing started
    (not even the database)."""
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ADVORCH_")},
        "ADVORCH_HOME": str(home),
        "ADVORCH_STORAGE_URI": uri,
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ADVORCH_STORAGE_URI=") and says in line
    assert not (home / "advorch.db").exists()


def test_a_local_storage_path_on_several_nodes_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.storage"):
        warn_if_local_on_a_cluster("/var/lib/advorch/storage", 3)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "/var/lib/advorch/storage" in record.getMessage()
    assert "refuses a local storage_path on several nodes" in record.getMessage()

    # Nothing to say on one node, or with storage every node reaches.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="service.storage"):
        warn_if_local_on_a_cluster("/var/lib/advorch/storage", 1)
        warn_if_local_on_a_cluster("s3://bucket/prefix", 3)
    assert caplog.records == []


# --- the local Ray head's environment --------------------------------------------------------


def test_the_local_ray_head_inherits_none_of_the_services_settings(tmp_path: Path) -> None:
    """Every process of the local cluster inherits the head's environment, and a job's code can
    read it: the admin's token, the server secret and the database URL stay out of it."""
    service_env = {
        "PATH": "/usr/bin",
        "HOME": "/home/someone",
        "ADVORCH_API_TOKEN": "the-admins-token",
        "ADVORCH_SECRET_KEY": "the-server-secret",
        "ADVORCH_DATABASE_URL": "postgresql+psycopg://advorch:password@db/advorch",
    }
    env = head_environment(tmp_path / "ray_auth_token", tmp_path / "bin", service_env)
    assert not [name for name in env if name.startswith("ADVORCH_")]
    for secret in ("the-admins-token", "the-server-secret", "password"):
        assert not [name for name, value in env.items() if secret in value], secret
    # What the head needs is there.
    assert env["HOME"] == "/home/someone"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_auth_token")
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")


# --- the banner ------------------------------------------------------------------------------


def test_the_banner_says_where_the_ray_dashboards_token_is(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, api_token=None)
    ray_jobs = RayJobs("http://127.0.0.1:8265", "a-token")  # connects on first use only
    banner = _banner(settings, ray_jobs, f"in {tmp_path / 'ray_auth_token'}")
    (line,) = [line for line in banner.splitlines() if "Ray dashboard:" in line]
    assert "http://127.0.0.1:8265" in line
    assert f"token: in {tmp_path / 'ray_auth_token'}" in line
    assert "a-token" not in banner  # where it is, never the token itself


def test_the_banner_names_a_clusters_token_as_ray_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.ray_cluster import cluster_auth_token_source

    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-clusters-token")
    assert cluster_auth_token_source() == "RAY_AUTH_TOKEN"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = tmp_path / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert cluster_auth_token_source().startswith("none found")
    token_file.write_text("the-clusters-token\n")
    assert cluster_auth_token_source() == f"in {token_file}"


# --- Tune's callbacks and the worker token ---------------------------------------------------


def job_env(worker_token: str) -> JobEnv:
    return JobEnv(
        job_id="job-1",
        service_url="http://127.0.0.1:1",
        worker_token=worker_token,
        spec_json="{}",
        storage_uri="/tmp/storage",
        data_dir="/tmp/data",
        node_wait_s=20.0,
    )


class _Trial:
    """What the callback reads of a Tune trial."""

    def __init__(self) -> None:
        self.last_result = {"epoch": 1}

    def __str__(self) -> str:
        return "trial_0001"


class _Reporter:
    def __init__(self, env: JobEnv, posted: list[tuple[str, str]]) -> None:
        self.env, self.posted = env, posted

    def trial(self, trial_key: str, **fields: Any) -> None:
        self.posted.append((self.env.worker_token, trial_key))

    def close(self) -> None:
        pass


def test_tunes_saved_callbacks_hold_no_worker_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune saves its callbacks with the experiment's state (on the storage every node sees):
    the job's token must not be in them. It is read from the environment when one posts."""
    for name, value in job_env("worker-token-at-start").as_env_vars().items():
        monkeypatch.setenv(name, value)
    callback = ReportStoppedTrials(epochs=3, by="ASHA")
    for dumped in (pickle.dumps(callback), cloudpickle.dumps(callback)):
        assert b"worker-token-at-start" not in dumped

    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        "workers.sweep.Reporter.for_job", lambda env, **options: _Reporter(env, posted)
    )
    # A restored experiment runs in a new process, with the environment it was given then.
    restored = pickle.loads(pickle.dumps(callback))
    monkeypatch.setenv("ADVORCH_WORKER_TOKEN", "worker-token-now")
    restored.on_trial_complete(0, [], _Trial())  # type: ignore[arg-type]
    assert posted == [("worker-token-now", "trial_0001")]


# --- ADVORCH_PASS_ENV ------------------------------------------------------------------------


def test_jobs_get_the_variables_pass_env_names_and_never_advorch_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    settings = Settings(pass_env=" AWS_ENDPOINT_URL, AWS_SECRET_ACCESS_KEY,")
    # A name the service's environment lacks is left out.
    assert settings.passed_env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    with pytest.raises(ValidationError, match="ADVORCH_SECRET_KEY is advorch's own setting"):
        Settings(pass_env="AWS_ENDPOINT_URL,ADVORCH_SECRET_KEY")


# --- a lost node -------------------------------------------------------------------------------


class _PendingTrial:
    """What FailWhereNoNodeFits reads of a Tune trial run again after a failure."""

    status = Trial.PENDING
    num_failures = 1
    trial_id = "a1"
    placement_group_factory = PlacementGroupFactory([{"CPU": 1, "GPU": 0, "second_node": 1}])

    def __str__(self) -> str:
        return "trial_0000"


def test_a_retried_trial_no_live_node_can_hold_fails_after_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    head = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}
    lost = {"Alive": False, "Resources": {"CPU": 1.0, "second_node": 1.0}}
    monkeypatch.setattr("workers.sweep.ray.nodes", lambda: [head, lost])
    trials: Any = [_PendingTrial()]

    waiting = FailWhereNoNodeFits(wait_s=60)
    waiting.on_step_begin(0, trials)  # within the wait: a node may join
    with pytest.raises(NodeLost) as caught:
        FailWhereNoNodeFits(wait_s=0).on_step_begin(0, trials)
    assert caught.value.trials == {
        "trial_0000": "its node was lost, and no live node has the resources to run it again "
        "(CPU: 1, second_node: 1) after 0 s"
    }
    # A live node with the resource: the trial waits for Tune to place it there.
    replacement = {"Alive": True, "Resources": {"CPU": 1.0, "second_node": 1.0}}
    monkeypatch.setattr("workers.sweep.ray.nodes", lambda: [head, lost, replacement])
    FailWhereNoNodeFits(wait_s=0).on_step_begin(0, trials)
