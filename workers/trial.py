"""One trial of a sweep: a Ray Tune function trainable that runs the training core as a Ray
Train ``TorchTrainer`` run, then evaluates the best model on the test split.

    run_trial(config)          one Tune trial: builds a TorchTrainer and calls fit()
      train_worker(config)     each Train worker: workers.training.run_training; then rank 0
                               attacks the best model (PGD, and AutoAttack when asked)

Two ways to run, chosen by the spec's ``resources.num_workers``:

- one worker: Ray Train's local mode (``ScalingConfig(num_workers=0)``), the training in the
  trial's own process. No controller, worker group or helper actors to start, which is most of
  a trial's overhead on Ray. Ray Train does not report to Tune in local mode, so the worker
  reports each epoch, with its checkpoint, to Tune itself.
- several workers: Ray Train workers with DDP across them; ``TuneReportCallback`` forwards rank
  0's reports to Tune, and Train keeps the checkpoints.

A lost process does not lose the trial: every epoch is a checkpoint. Tune's ``FailureConfig``
restarts a trial whose process was lost (a lost node) from its last checkpoint, and Train's
restarts a lost worker of a multi-worker trial. Run names come from the job and the trial
(never a timestamp), so a rerun finds its checkpoints; a rerun that finds the training done
goes straight to the evaluation, and AutoAttack resumes from its state file.

Rank 0 posts the trial's results as they happen: each epoch's metrics, the best model whenever
a new best epoch is found (uploaded to the service), AutoAttack's progress after each attack,
and the final numbers. The trial itself says that it started; the sweep's driver reports the
trials that end in an error, with why (``workers.entrypoint``).
"""

from __future__ import annotations

import logging
import shutil
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayTaskError
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from workers.autoattack import progress_poster
from workers.data import load_dataset
from workers.device import memory_format
from workers.evaluate import RobustnessResult, evaluate_robustness
from workers.job_env import JobEnv
from workers.reporter import Reporter
from workers.spec import JobSpec
from workers.training import BEST_CHECKPOINT, TrainingResult, run_training

log = logging.getLogger(__name__)

# How often a multi-worker trial's workers are restarted from the last checkpoint after one of
# them fails (an OOM kill, a lost node). Errors of the training itself fail again, so this
# stays small; a trial's own process lost is Tune's to retry (workers.sweep).
MAX_WORKER_FAILURES = 1
# Ray's exceptions that mean a process or its node went away, not that the code failed.
LOST_PROCESS_ERRORS = (ActorDiedError, ActorUnavailableError, NodeDiedError)


def run_trial(config: dict[str, Any], *, use_gpu: bool) -> None:
    """A Tune trial: ``config`` is the trial's overrides by dotted path ({"training.beta": 6.0})."""
    env = JobEnv.from_environ()
    job_spec = JobSpec.model_validate_json(env.spec_json)
    overrides = plain_config(config)
    # The sweep names every trial by its key (see workers.sweep.trial_key).
    trial_key = tune.get_context().get_trial_name()
    seed = job_spec.sampled_trial_seed(int(trial_key.rsplit("_", 1)[1]))
    if seed is not None:
        overrides["training.seed"] = seed
    spec = job_spec.trial_spec(overrides)
    local = runs_locally(spec)
    storage_path, storage_filesystem = env.ray_storage()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "trial_key": trial_key,
            "overrides": overrides,
            "spec": spec.model_dump(mode="json"),
            "local": local,
            "use_gpu": use_gpu,
        },
        scaling_config=scaling_config(spec, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"{env.job_id}-{trial_key}",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
            # The last epoch's is all a restart needs; best.pt inside it is the best so far.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # mypy sees ray.train's Train V1 names; at run time they are V2's, which take this.
            callbacks=[] if local else [TuneReportCallback()],  # type: ignore[list-item]
        ),
    )
    with closing(Reporter.for_job(env)) as reporter:
        reporter.trial(trial_key, config=overrides, status="running")
    trainer.fit()


def scaling_config(spec: JobSpec, *, use_gpu: bool) -> ScalingConfig:
    """The trial's Train workers: none in local mode (the trial's own process trains, with the
    resources Tune reserved for it: workers.sweep.trial_resources), else ``num_workers`` of
    ``cpus_per_worker`` CPUs and the spec's custom resources each."""
    resources = spec.resources
    if runs_locally(spec):
        return ScalingConfig(num_workers=0, use_gpu=False)
    return ScalingConfig(
        num_workers=resources.num_workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": resources.cpus_per_worker, **resources.custom},
    )


def runs_locally(spec: JobSpec) -> bool:
    """Whether a trial trains in its own process (Train's local mode): when it has one worker."""
    return spec.resources.num_workers == 1


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: train, then on rank 0 evaluate the best model on the
    test split and post the trial's results."""
    env = JobEnv.from_environ()
    spec = JobSpec.model_validate(config["spec"])
    trial_key: str = config["trial_key"]
    local: bool = config["local"]
    if local:  # Ray Train's context is Tune's here, which has no ranks: there is one worker
        rank, world_size = 0, 1
        use_gpu = config["use_gpu"] and torch.cuda.is_available()
        device = torch.device("cuda" if use_gpu else "cpu")
    else:
        context = ray.train.get_context()
        rank, world_size = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
    reporter = Reporter.for_job(env) if rank == 0 else None

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if reporter is not None:
            reporter.epoch_metrics(trial_key, metrics)
            if checkpoint_dir is not None and metrics["best_epoch"] == metrics["epoch"]:
                epoch = int(metrics["epoch"])
                reporter.upload_checkpoint(trial_key, checkpoint_dir / BEST_CHECKPOINT, epoch=epoch)
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if local:
            tune.report(metrics, checkpoint=checkpoint)
        else:  # a barrier across the workers: every rank reports every epoch
            name = f"epoch_{int(metrics['epoch']):04d}"
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    # Set when the trial is run again after a failure: where to resume from.
    last_checkpoint = tune.get_checkpoint() if local else ray.train.get_checkpoint()
    try:
        with last_checkpoint.as_directory() if last_checkpoint else nullcontext() as resume_dir:
            result = run_training(
                spec,
                report,
                device=device,
                data_root=Path(env.data_dir),
                resume_from=Path(resume_dir) if resume_dir else None,
                rank=rank,
                world_size=world_size,
                wrap_model=ray.train.torch.prepare_model if world_size > 1 else None,
            )
        if reporter is not None:
            evaluate_trial(spec, result, env, reporter, trial_key, config["overrides"], device)
    finally:
        if reporter is not None:
            reporter.close()


def evaluate_trial(
    spec: JobSpec,
    result: TrainingResult,
    env: JobEnv,
    reporter: Reporter,
    trial_key: str,
    overrides: dict[str, Any],
    device: torch.device,
) -> RobustnessResult:
    """Attack the best epoch's model on the test split at the job's evaluation epsilon (PGD,
    then AutoAttack when asked, its progress posted after each attack) and post the trial's
    final results."""
    assert result.best_model is not None, "rank 0 keeps the best model"
    x_test, y_test = load_dataset(spec.dataset.name, "test", Path(env.data_dir))
    x_test, y_test = x_test.to(device, memory_format=memory_format(device)), y_test.to(device)
    scratch = env.scratch_dir(trial_key)
    seed = spec.training.seed

    evaluation = evaluate_robustness(
        result.best_model,
        x_test,
        y_test,
        spec.evaluation,
        epsilon=float(spec.evaluation.epsilon or 0),
        seed=seed,
        autoattack_state=scratch / "autoattack.json",
        on_attack=progress_poster(
            lambda progress: reporter.trial(trial_key, config=overrides, autoattack=progress)
        ),
    )
    autoattack = evaluation.autoattack
    reporter.trial(
        trial_key,
        config=overrides,
        status="succeeded",
        clean_acc=evaluation.clean_acc,
        robust_acc=evaluation.robust_acc,
        autoattack_acc=autoattack.accuracy if autoattack else None,
        autoattack=autoattack.as_report() if autoattack else None,
        best_epoch=result.best_epoch,
        val_clean_acc=result.best_metrics["val_clean_acc"],
        val_robust_acc=result.best_metrics["val_robust_acc"],
        weights=result.weights,
    )
    shutil.rmtree(scratch, ignore_errors=True)
    return evaluation


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune config with numpy scalars (what Tune's samplers draw) made plain Python values,
    which the strict spec and JSON both take."""
    return {key: value.item() if hasattr(value, "item") else value for key, value in config.items()}


def failure_message(err: BaseException) -> str:
    """Why a trial failed, as users want to read it: the training's own exception
    (``FileNotFoundError: ...``), not the Ray wrappers and tracebacks around it; a process or
    node that went away says so."""
    if isinstance(err, RayTaskError) and isinstance(err.cause, BaseException):
        err = err.cause
    if isinstance(err, ray.train.WorkerGroupError) and err.worker_failures:
        _, err = min(err.worker_failures.items())
        return failure_message(err)
    if isinstance(err, LOST_PROCESS_ERRORS):
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"its node was lost (or its process died): {type(err).__name__}: {first_line}"
    return f"{type(err).__name__}: {err}".strip()
