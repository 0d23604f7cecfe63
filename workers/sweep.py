"""The Ray Tune sweep of one job: the spec's ``sweep`` (or a single trial when it has none) as
a ``Tuner`` over ``workers.trial.run_trial``.

    grid, random  Tune's variant generator: every grid combination, ``num_samples`` times,
                  with ``choice`` and ranges sampled (seeded by ``training.seed``)
    optuna        Optuna's TPE sampler proposes each trial from the results so far
    fifo, asha    the scheduler: run every trial to the end, or stop weak ones early (ASHA,
                  by epoch)

Search and scheduler maximise the sweep's metric per epoch on the validation split
(``val_robust_acc`` for ``robust_acc``); the test split is for the trials' final numbers only.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import (
    BasicVariantGenerator,
    ConcurrencyLimiter,
    SearchAlgorithm,
    SearchGenerator,
)
from ray.tune.search.optuna import OptunaSearch

from workers.job_env import JobEnv
from workers.reporter import Reporter
from workers.spec import JobSpec, ParameterSpace, SweepSpec
from workers.trial import plain_config, run_trial

# A trial's own process only waits on its Train workers, which reserve the CPUs the training
# uses. It reserves no CPU (even 0.01 of one would keep two 1-CPU trials from sharing two
# cores), only the memory it holds; Tune wants some resource in every trial's request.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"cpu": 0, "memory": 512 * 2**20}


def run_sweep(spec: JobSpec, env: JobEnv, *, use_gpu: bool) -> tune.ResultGrid:
    """Run every trial of the job; returns Tune's results (one per trial, errors included)."""
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, use_gpu=use_gpu), TRIAL_DRIVER_RESOURCES
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(spec.sweep),
        tune_config=tune_config(spec),
        run_config=tune.RunConfig(
            name=f"{env.job_id}-sweep",
            storage_path=env.ray_storage_path,
            callbacks=[ReportStoppedTrials(env, epochs=spec.training.epochs)],
        ),
    )
    return tuner.fit()


def search_space(sweep: SweepSpec | None) -> dict[str, Any]:
    """Tune's param_space: each swept field, by dotted path, as a Tune domain."""
    if sweep is None:
        return {}
    return {path: _domain(space) for path, space in sweep.parameters.items()}


def _domain(space: ParameterSpace) -> Any:
    if space.grid is not None:
        return tune.grid_search(space.grid)
    if space.choice is not None:
        return tune.choice(space.choice)
    if space.uniform is not None:
        return tune.uniform(*space.uniform)
    assert space.loguniform is not None, "ParameterSpace validates that one kind is given"
    return tune.loguniform(*space.loguniform)


def tune_config(spec: JobSpec) -> tune.TuneConfig:
    sweep = spec.sweep
    if sweep is None:
        return tune.TuneConfig(trial_name_creator=trial_key, trial_dirname_creator=trial_key)
    return tune.TuneConfig(
        metric=f"val_{sweep.metric}",
        mode="max",
        search_alg=_search_algorithm(sweep, seed=spec.training.seed),
        scheduler=_scheduler(sweep, epochs=spec.training.epochs),
        num_samples=sweep.num_samples,
        trial_name_creator=trial_key,
        trial_dirname_creator=trial_key,
    )


def _search_algorithm(sweep: SweepSpec, *, seed: int) -> SearchAlgorithm:
    """The search, limited to ``max_concurrent_trials`` trials at once. (Tune ignores
    TuneConfig's limit when it is given a search algorithm, so the limit is set here.)"""
    if sweep.search == "optuna":
        return SearchGenerator(
            ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=sweep.max_concurrent_trials)
        )
    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials, random_state=seed)


def _scheduler(sweep: SweepSpec, *, epochs: int) -> TrialScheduler:
    if sweep.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1)
    return FIFOScheduler()


def trial_key(trial: Trial) -> str:
    """A trial's key, the name the service knows it by: its place in the order the search
    made the trials (``trial_0003``), the same when the sweep is restored."""
    # Tune's experiment tag starts with that counter: "3_training.beta=6.0000".
    number = int(trial.experiment_tag.split("_", 1)[0])
    return f"trial_{number:04d}"


class ReportStoppedTrials(tune.Callback):
    """Tells the service of trials the scheduler ended early (ASHA): they end without error
    before their last epoch, in a process Tune has stopped, so nothing else can say so.

    Tune saves its callbacks with the experiment's state, so this keeps the job's
    (picklable) JobEnv and opens a Reporter only to post."""

    def __init__(self, env: JobEnv, *, epochs: int) -> None:
        self.env = env
        self.epochs = epochs

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        last_epoch = (trial.last_result or {}).get("epoch", 0)
        if last_epoch < self.epochs:
            with closing(Reporter.for_job(self.env)) as reporter:
                reporter.trial(
                    trial_key(trial), config=plain_config(trial.config), status="stopped"
                )
