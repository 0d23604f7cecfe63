"""An evaluate job: no training, one model attacked on the test split at each epsilon of the
spec's list, giving a robustness curve (accuracy against epsilon).

The entrypoint runs it as one Ray task, with the job's CPUs and a GPU where there is one (the
entrypoint itself runs on the head, which may have none); cancelling the job stops the task.
The task downloads the model the job's source names from the service, loads it (an advorch
checkpoint or a torch.export program) and posts each point as its attacks finish, AutoAttack's
progress included. A task whose process is lost is run again by Ray, and resumes: points it
finished are posted again from its results, AutoAttack from its state file.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch

from workers.autoattack import progress_poster
from workers.data import NUM_CLASSES, load_dataset
from workers.device import default_device, memory_format
from workers.evaluate import RobustnessResult, evaluate_robustness
from workers.job_env import JobEnv
from workers.models import load_model, model_architecture
from workers.reporter import Reporter
from workers.spec import ARCH_PATH, JobSpec

# An evaluate job is one trial, under this key, whose curve holds its points.
EVALUATION_TRIAL = "trial_0000"
# How often Ray runs the task again when its process or node was lost.
MAX_TASK_RETRIES = 2


def run_evaluation_job(spec: JobSpec, *, use_gpu: bool) -> None:
    """Run the evaluate job's task on the cluster and wait for it (raises what it raised)."""
    task = evaluate_source.options(
        num_cpus=spec.resources.cpus_per_worker,
        num_gpus=1 if use_gpu else 0,
        resources=spec.resources.custom,
        max_retries=MAX_TASK_RETRIES,
    )
    ray.get(task.remote(spec.submitted()))


@ray.remote
def evaluate_source(spec_data: dict[str, Any]) -> None:
    """The task: attack the source model at every epsilon and post the curve (``spec_data``:
    the spec as submitted)."""
    spec = JobSpec.model_validate(spec_data)
    env = JobEnv.from_environ()
    config = {"source": spec.source.model_dump(exclude_none=True) if spec.source else {}}
    reporter = Reporter.for_job(env)
    try:
        reporter.trial(EVALUATION_TRIAL, config=config, status="running")
        try:
            evaluate_curve(spec, env, reporter, config)
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
            reporter.trial(EVALUATION_TRIAL, config=config, status="failed", error=message)
            raise
    finally:
        reporter.close()


def evaluate_curve(
    spec: JobSpec, env: JobEnv, reporter: Reporter, config: dict[str, Any]
) -> list[RobustnessResult]:
    scratch = env.scratch_dir(EVALUATION_TRIAL)
    device = default_device()
    source = reporter.download_source(scratch / "model")
    model = load_model(source).to(device)
    # The spec's model.arch is only its default: the trial's config says which architecture
    # was attacked, for the results and the RobustBench export to report.
    config = {**config, ARCH_PATH: model_architecture(source)}
    x_test, y_test = load_dataset(spec.dataset.name, "test", Path(env.data_dir))
    check_fits(model, x_test, spec.dataset.name)
    x_test, y_test = x_test.to(device, memory_format=memory_format(device)), y_test.to(device)
    assert spec.evaluation.epsilons is not None, "an evaluate job's spec resolves its epsilons"
    results = []
    for epsilon in spec.evaluation.epsilons:
        result = evaluate_robustness(
            model,
            x_test,
            y_test,
            spec.evaluation,
            epsilon=epsilon,
            seed=spec.training.seed,
            autoattack_state=scratch / f"autoattack-{epsilon!r}.json",
            on_attack=progress_poster(partial(post_point, reporter, epsilon)),
            on_pgd=lambda r: reporter.curve_point(EVALUATION_TRIAL, point(r)),
        )
        reporter.curve_point(EVALUATION_TRIAL, point(result))
        results.append(result)
    # The trial's own numbers are the curve's at the job's evaluation epsilon.
    headline = point(next(r for r in results if r.epsilon == spec.evaluation.epsilon))
    del headline["epsilon"]
    reporter.trial(EVALUATION_TRIAL, config=config, status="succeeded", **headline)
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def post_point(reporter: Reporter, epsilon: float, autoattack: dict[str, Any]) -> None:
    """AutoAttack's progress at one epsilon of the curve."""
    reporter.curve_point(EVALUATION_TRIAL, {"epsilon": epsilon, "autoattack": autoattack})


def point(result: RobustnessResult) -> dict[str, Any]:
    """A result as the service keeps it (a curve point, or the trial's numbers)."""
    autoattack = result.autoattack
    return {
        "clean_acc": result.clean_acc,
        "robust_acc": result.robust_acc,
        "autoattack_acc": autoattack.accuracy if autoattack else None,
        "autoattack": autoattack.as_report() if autoattack else None,
        "epsilon": result.epsilon,
    }


def check_fits(model: torch.nn.Module, x: torch.Tensor, dataset: str) -> None:
    """Fail clearly when the model does not classify this data set's images."""
    try:
        with torch.no_grad():
            logits = model(x[:2])
    except Exception as err:
        raise ValueError(
            f"the model does not take {dataset} images of shape {tuple(x.shape[1:])}: {err}"
        ) from err
    classes = NUM_CLASSES[dataset]
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise ValueError(
            f"the model gives outputs of shape {tuple(logits.shape)} for {dataset}; "
            f"it must give {classes} class logits per image"
        )
