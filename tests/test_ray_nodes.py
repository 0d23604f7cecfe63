"""A second Ray node, and S3: jobs on a cluster of several nodes, end to end through REST.

The session's Ray head gets worker nodes of its own on this machine (`ray start --address`,
their own temp dirs, one CPU, the custom resource ``second_node``), which a spec's
``resources.custom`` pins trials to. The service keeps its artifacts, and Ray Train its
checkpoints, on S3: a moto server on 127.0.0.1, whose endpoint and fake credentials reach the
jobs' processes on every node through ``ADVORCH_PASS_ENV``. Ray's rule holds here as on a real
cluster: a trial on a node other than the Tune driver's needs storage both nodes reach.

- A trial pinned to a worker node trains there; that node lost (SIGKILL of its whole process
  group, after the first epoch), the trial resumes from its last checkpoint on another node
  with the resource. Its results, checkpoint download and the bucket's objects are checked.
- Lost where no other node has the resource, the trial and its job fail saying the node was
  lost, and nothing is left running.

Digits, small_cnn, 8 short epochs, 2-step attacks: CPU-sized.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from service.ray_cluster import LocalRayHead, RayJobs
from tests.conftest import start_service
from tests.ray_support import (
    Service,
    WorkerNode,
    assert_every_trial_ended,
    epochs_done,
    get,
    pids_titled,
    start_worker_node,
    submit,
    trades_spec,
    training_processes,
    wait_for,
    wait_until_finished,
)
from workers.data import load_dataset
from workers.evaluate import clean_accuracy
from workers.models import load_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUCKET = "advorch-test"
# The custom resource only the worker nodes declare, and a spec that asks for it.
RESOURCE = "second_node"
PINNED = {"num_workers": 1, "cpus_per_worker": 1, "custom": {RESOURCE: 1}}
# Epochs of the trials: a digits epoch takes about a second here, so the trial is still
# training when its node is lost after the first.
EPOCHS = 8
# A one-worker trial trains in its own process (Train's local mode), titled so.
TRIAL_PROCESS = "ray::ImplicitFunc"
# Ray's GCS declares a node dead some health checks after it stops answering.
NODE_DEATH_TIMEOUT_S = 90.0
# How long the service's jobs let a trial whose node was lost wait for another that can run it.
NODE_WAIT_S = 5


@dataclass
class S3:
    """A moto S3 server and the environment that points boto3, s3fs and pyarrow at it."""

    endpoint: str
    env: dict[str, str]

    def keys(self, prefix: str) -> list[str]:
        client = boto3.client("s3", endpoint_url=self.endpoint, **_credentials(self.env))
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for item in listing.get("Contents", [])]


def _credentials(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    # Its request log (werkzeug's) would be most of a failed test's output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        # botocore (boto3, s3fs) takes the endpoint from the environment.
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client("s3", endpoint_url=endpoint, **_credentials(env)).create_bucket(Bucket=BUCKET)
    yield S3(endpoint=endpoint, env=env)
    server.stop()


@pytest.fixture(scope="module")
def s3_service(
    ray_head: LocalRayHead, s3: S3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """`advorch serve` on the session's cluster with its artifact store and Ray Train's storage
    on S3, handing the S3 settings to the jobs it submits."""
    service = start_service(
        ray_head,
        tmp_path_factory.mktemp("advorch-home-s3"),
        ADVORCH_ARTIFACTS=f"s3://{BUCKET}/artifacts",
        ADVORCH_STORAGE_URI=f"s3://{BUCKET}/ray",
        ADVORCH_PASS_ENV=",".join(s3.env),
        # A stranded trial waits this long for a node that can run it (20 s by default).
        ADVORCH_NODE_WAIT_S=str(NODE_WAIT_S),
        **s3.env,
    )
    yield service
    service.stop_if_running()


@pytest.fixture(scope="module")
def s3_api(s3_service: Service) -> Iterator[httpx.Client]:
    with s3_service.client() as client:
        yield client


@dataclass
class WorkerNodes:
    """The worker nodes this module joins to the session's head, each with ``second_node``."""

    head: LocalRayHead
    ray_jobs: RayJobs
    temp_root: Path
    started: list[WorkerNode] = field(default_factory=list)

    def live(self) -> list[WorkerNode]:
        return [node for node in self.started if node.process.poll() is None]

    def exactly(self, count: int) -> list[WorkerNode]:
        """Make ``count`` worker nodes live (stop or start some), and wait until the cluster
        shows them all and no other (a killed node is alive to Ray until it is declared
        dead)."""
        for node in self.live()[count:]:
            node.stop()
        while len(self.live()) < count:
            temp_dir = self.temp_root / f"node-{len(self.started)}"
            self.started.append(
                start_worker_node(self.head, temp_dir, resources={RESOURCE: 1}, num_cpus=1)
            )
        wait_for(
            f"the cluster to show {count + 1} nodes",
            lambda: self.ray_jobs.alive_nodes() == count + 1,
            NODE_DEATH_TIMEOUT_S,
        )
        return self.live()

    def stop_all(self) -> None:
        for node in self.started:
            node.stop()


@pytest.fixture(scope="module")
def worker_nodes(ray_head: LocalRayHead, ray_jobs: RayJobs) -> Iterator[WorkerNodes]:
    """One worker node joined to the session's head (tests add more); all stopped at the end,
    and the cluster back to its head alone for the tests after."""
    # Short, for the node's socket paths (Linux caps a socket's path at 107 bytes).
    temp_root = Path(f"/tmp/advorch-nodes-{ray_head.process.pid}")
    nodes = WorkerNodes(head=ray_head, ray_jobs=ray_jobs, temp_root=temp_root)
    try:
        nodes.exactly(1)
        yield nodes
    finally:
        nodes.stop_all()
        wait_for("the worker nodes to leave", lambda: ray_jobs.alive_nodes() == 1, 90)
        shutil.rmtree(temp_root, ignore_errors=True)


def node_training(nodes: list[WorkerNode]) -> WorkerNode | None:
    """The one of ``nodes`` a trial's process runs on, if any."""
    return next((node for node in nodes if pids_titled(node, TRIAL_PROCESS)), None)


def test_a_pinned_trial_trains_on_its_node_and_resumes_on_another_when_it_is_lost(
    s3_api: httpx.Client,
    s3: S3,
    ray_head: LocalRayHead,
    worker_nodes: WorkerNodes,
    tmp_path: Path,
) -> None:
    """Two worker nodes declare second_node; the trial asks for it, so it trains on one of them.
    That node killed after the first epoch, Tune runs the trial again on the other, from its
    last checkpoint, read back from S3."""
    nodes = worker_nodes.exactly(2)
    job_id = submit(s3_api, trades_spec("pinned-resumes", epochs=EPOCHS, resources=PINNED))

    wait_for("the first epoch", lambda: epochs_done(s3_api, job_id) >= 1)
    first = wait_for("the trial's process on a worker node", lambda: node_training(nodes), 30)
    assert not pids_titled(ray_head, TRIAL_PROCESS), "the head has no second_node"
    done_before = epochs_done(s3_api, job_id)
    killed_at = time.monotonic()
    first.kill()
    assert done_before < EPOCHS, "the trial was still training"

    (other,) = [node for node in nodes if node is not first]
    wait_for("the trial's process on the other node", lambda: node_training([other]), 120)
    running_again_s = time.monotonic() - killed_at
    wait_for("the next epoch", lambda: epochs_done(s3_api, job_id) > done_before, 120)
    next_epoch_s = time.monotonic() - killed_at
    print(
        f"\nlost node: the trial ran again on the other node {running_again_s:.1f} s after the "
        f"kill, and posted its next epoch after {next_epoch_s:.1f} s"
    )

    job = wait_until_finished(s3_api, job_id)
    assert job["status"] == "succeeded", job["error"]
    (trial,) = assert_every_trial_ended(s3_api, job_id)
    assert trial["status"] == "succeeded" and trial["robust_acc"] is not None
    epochs = get(s3_api, f"/v1/jobs/{job_id}/trials/{trial['key']}/metrics")
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    # Run again from its checkpoint, not from epoch 1.
    assert "resuming after epoch" in get(s3_api, f"/v1/jobs/{job_id}/logs")["logs"]

    # The best checkpoint comes from the service's store on S3, and is the trial's model.
    response = s3_api.get(f"/v1/jobs/{job_id}/trials/{trial['key']}/checkpoint")
    assert response.status_code == 200, response.text
    (tmp_path / "best.pt").write_bytes(response.content)
    model = load_checkpoint(tmp_path / "best.pt")
    x_test, y_test = load_dataset("digits", "test")
    assert clean_accuracy(model, x_test, y_test) == pytest.approx(trial["clean_acc"])
    # Both stores wrote to the bucket: the service's artifact store, and Tune's run with the
    # trial's last checkpoint (a one-worker trial's, Train's local mode, are Tune's).
    assert s3.keys(f"artifacts/checkpoints/{job_id}/{trial['key']}/")
    tune_trial = f"ray/{job_id}/ray/{job_id}-sweep/{trial['key']}/"
    assert any("/checkpoint_" in key for key in s3.keys(tune_trial)), s3.keys(tune_trial)


def test_a_lost_node_no_other_node_can_replace_fails_its_trial_saying_so(
    s3_api: httpx.Client, ray_head: LocalRayHead, worker_nodes: WorkerNodes
) -> None:
    """The only node with second_node killed mid-trial: Tune would wait for one forever; the
    sweep fails the trial, and the job, saying its node was lost."""
    (node,) = worker_nodes.exactly(1)
    job_id = submit(s3_api, trades_spec("pinned-stranded", epochs=EPOCHS, resources=PINNED))
    wait_for("the first epoch", lambda: epochs_done(s3_api, job_id) >= 1)
    assert node_training([node]), "the trial trains on the worker node"
    killed_at = time.monotonic()
    node.kill()

    job: dict[str, Any] = wait_until_finished(s3_api, job_id)
    print(f"\nlost node, no other place: the job failed {time.monotonic() - killed_at:.1f} s after")
    assert job["status"] == "failed"
    assert "its node was lost" in job["error"], job["error"]
    (trial,) = assert_every_trial_ended(s3_api, job_id)
    assert trial["status"] == "failed"
    assert trial["error"].startswith("its node was lost"), trial["error"]
    assert f"{RESOURCE}: 1" in trial["error"]
    assert trial["error"].endswith(f"after {NODE_WAIT_S} s"), trial["error"]
    assert epochs_done(s3_api, job_id) < EPOCHS
    wait_for("the job's processes to exit", lambda: not training_processes(ray_head), 60)
