"""One trial of a sweep: a Ray Tune function trainable that runs the training core as a Ray
Train run, DDP across the spec's workers.

    run_trial(config)          one Tune trial: builds a TorchTrainer and calls fit()
      train_worker(config)     each Train worker: workers.training.run_training

Rank 0 posts the trial's results to the service as they happen: each epoch's metrics, then
its final clean and robust accuracy, best epoch and the location of its best checkpoint. The
trial itself posts what rank 0 cannot: that the trial started, and that it failed, with why.

A lost worker does not lose the trial: every epoch is also a Ray Train checkpoint, and
``FailureConfig`` restarts the workers from the last one. Run names come from the job and the
trial (never a timestamp), so a rerun finds its checkpoints.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
from ray import tune
from ray.exceptions import RayTaskError
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from workers.job_env import JobEnv
from workers.reporter import Reporter
from workers.spec import JobSpec
from workers.training import BEST_CHECKPOINT, run_training

# How often a trial's workers are restarted from the last checkpoint after one of them fails
# (a lost node, an OOM kill). Errors of the training itself fail again, so this stays small.
MAX_WORKER_FAILURES = 1


def run_trial(config: dict[str, Any], *, use_gpu: bool) -> None:
    """A Tune trial: ``config`` is the trial's overrides by dotted path ({"training.beta": 6.0})."""
    env = JobEnv.from_environ()
    overrides = plain_config(config)
    spec = JobSpec.model_validate_json(env.spec_json).trial_spec(overrides)
    # The sweep names every trial by its key (see workers.sweep.trial_key).
    trial_key = tune.get_context().get_trial_name()
    resources = spec.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "trial_key": trial_key,
            "overrides": overrides,
            "spec": spec.model_dump(mode="json"),
        },
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"{env.job_id}-{trial_key}",
            storage_path=env.ray_storage_path,
            failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
            # The last epoch's is all a restart needs; best.pt inside it is the best so far.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # mypy sees ray.train's Train V1 names; at run time they are V2's, which take this.
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
        ),
    )
    reporter = Reporter.for_job(env)
    try:
        reporter.trial(trial_key, config=overrides, status="running")
        try:
            trainer.fit()
        except Exception as err:
            reporter.trial(trial_key, config=overrides, status="failed", error=failure_message(err))
            raise
    finally:
        reporter.close()


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial; rank 0 reports to the service."""
    env = JobEnv.from_environ()
    spec = JobSpec.model_validate(config["spec"])
    trial_key: str = config["trial_key"]
    overrides: dict[str, Any] = config["overrides"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    reporter = Reporter.for_job(env) if rank == 0 else None
    best_path = env.best_checkpoint_path(trial_key)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if reporter is not None:
            reporter.epoch_metrics(trial_key, metrics)
        checkpoint = None
        if checkpoint_dir is not None:
            replace_file(checkpoint_dir / BEST_CHECKPOINT, best_path)
            checkpoint = Checkpoint.from_directory(checkpoint_dir)
        # A barrier across the workers: every rank reports every epoch.
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{int(metrics['epoch']):04d}"
        )

    last_checkpoint = ray.train.get_checkpoint()  # set when restarted after a failure
    try:
        with last_checkpoint.as_directory() if last_checkpoint else nullcontext() as resume_dir:
            results = run_training(
                spec,
                report,
                device=ray.train.torch.get_device(),
                data_root=Path(env.data_dir),
                resume_from=Path(resume_dir) if resume_dir else None,
                rank=rank,
                world_size=context.get_world_size(),
                wrap_model=ray.train.torch.prepare_model,
            )
        if reporter is not None:
            reporter.trial(
                trial_key,
                config=overrides,
                status="succeeded",
                clean_acc=results["clean_acc"],
                robust_acc=results["robust_acc"],
                best_epoch=int(results["best_epoch"]),
                checkpoint_uri=str(best_path),
            )
    finally:
        if reporter is not None:
            reporter.close()


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune config with numpy scalars (what Tune's samplers draw) made plain Python values,
    which the strict spec and JSON both take."""
    return {key: value.item() if hasattr(value, "item") else value for key, value in config.items()}


def replace_file(source: Path, target: Path) -> None:
    """Copy ``source`` over ``target`` atomically, so that the file at ``target`` (which the
    service may be serving) is always a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    draft = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.copyfile(source, draft)
    draft.replace(target)


def failure_message(err: BaseException) -> str:
    """Why a trial failed, as users want to read it: the training's own exception
    (``FileNotFoundError: ...``), not the Ray wrappers and tracebacks around it."""
    if isinstance(err, RayTaskError) and isinstance(err.cause, BaseException):
        err = err.cause
    if isinstance(err, ray.train.WorkerGroupError) and err.worker_failures:
        _, err = min(err.worker_failures.items())
        return failure_message(err)
    return f"{type(err).__name__}: {err}".strip()
