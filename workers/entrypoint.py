"""The Ray Job of one advorch job: ``python -m workers.entrypoint``.

The dispatcher submits it with the job's ``JobEnv`` in its environment. It tells the service
the job is running, runs the Tune sweep (or an evaluate job's task), reports each trial that
ended in an error with why (its process may be gone, lost with its node, so nothing else
can), and ends the job ``succeeded``, or ``failed`` with the failed trials' errors. It exits 0
exactly when the job succeeded, so when its last post cannot reach the service the reconciler
still learns the outcome from Ray.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import ray

from workers.evaluation_job import run_evaluation_job
from workers.job_env import JobEnv
from workers.reporter import JobClosed, Reporter
from workers.spec import JobSpec
from workers.sweep import NodeLost, run_sweep
from workers.trial import failure_message

log = logging.getLogger("advorch.entrypoint")

# A job's error names the first few failed trials; each trial keeps its own.
MAX_ERRORS_SHOWN = 3


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    env = JobEnv.from_environ()
    reporter = Reporter.for_job(env)
    try:
        return run_job(env, reporter)
    except JobClosed as err:
        # A user cancelled the job: the dispatcher is stopping this Ray Job too.
        log.info("the service takes no more reports for this job (%s); stopping", err)
        return 0
    except Exception as err:
        log.exception("the job failed")
        reporter.job_event("failed", reason="the job could not run", error=failure_message(err))
        return 1
    finally:
        reporter.close()


def run_job(env: JobEnv, reporter: Reporter) -> int:
    spec = JobSpec.model_validate_json(env.spec_json)
    ray.init()  # the cluster this Ray Job runs on
    use_gpu = uses_gpu(spec.resources.use_gpu)
    device = "GPU" if use_gpu else "CPU"
    if spec.kind == "evaluate":
        reporter.job_event("running", reason=f"the evaluation started on Ray ({device})")
        run_evaluation_job(spec, use_gpu=use_gpu)
        reporter.job_event("succeeded", reason="the model was attacked at every epsilon")
        return 0
    reporter.job_event(
        "running", reason=f"a Tune sweep of {spec.num_trials()} trial(s) started on Ray ({device})"
    )
    try:
        results = run_sweep(spec, env, use_gpu=use_gpu)
    except NodeLost as err:
        # The sweep ended without them: each says why; the job's end ends any other trial.
        for key, why in err.trials.items():
            reporter.trial(key, config={}, status="failed", error=why)
        reporter.job_event(
            "failed",
            reason=f"{len(err.trials)} trial(s) lost their node, and no live node can run them",
            error=str(err),
        )
        return 1
    trials = [results[i] for i in range(len(results))]
    failures = []
    for trial in trials:
        if trial.error is not None:
            key, message = Path(trial.path).name, failure_message(trial.error)
            reporter.trial(key, config={}, status="failed", error=message)
            failures.append(f"{key}: {message}")
    if failures:
        shown = failures[:MAX_ERRORS_SHOWN]
        if len(failures) > len(shown):
            shown.append(f"and {len(failures) - len(shown)} more (see each trial)")
        reporter.job_event(
            "failed",
            reason=f"{len(failures)} of {len(trials)} trials failed",
            error="; ".join(shown),
        )
        return 1
    reporter.job_event("succeeded", reason=f"all {len(trials)} trials finished")
    return 0


def uses_gpu(use_gpu: bool | str) -> bool:
    """The spec's ``use_gpu``, with ``auto`` meaning: when the cluster has GPUs."""
    if use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(use_gpu)


if __name__ == "__main__":
    sys.exit(main())
