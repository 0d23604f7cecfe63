"""The Ray Tune sweep of one job: the spec's ``sweep`` (or a single trial when it has none) as
a ``Tuner`` over ``workers.trial.run_trial``.

    grid, random  Tune's variant generator: every grid combination, ``num_samples`` times,
                  with ``choice`` and ranges sampled (seeded by ``training.seed``); the
                  repeats of a grid are a grid over the seed, training.seed plus the repeat's
                  index, so that they are repeats and not the same run again
    optuna        Optuna's TPE sampler proposes each trial from the results so far
    fifo, asha,   the scheduler: run every trial to the end, or stop weak ones early by
    halving       epoch, each as it reaches a rung (ASHA) or once every trial has reached it
                  (synchronous successive halving: workers.halving)

Search and scheduler maximise the sweep's metric per epoch on the validation split
(``val_robust_acc`` for ``robust_acc``); the test split is for the trials' final numbers only.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import ray
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

from workers.halving import HalvingVariantGenerator, SuccessiveHalving
from workers.job_env import JobEnv
from workers.reporter import Reporter
from workers.spec import SEED_PATH, JobSpec, ParameterSpace, SweepSpec
from workers.trial import run_trial, runs_locally

# A multi-worker trial's own process only waits on its Train workers, which reserve the CPUs
# the training uses. It reserves no CPU (even 0.01 of one would keep two 1-CPU trials from
# sharing two cores), only the memory it holds; Tune wants some resource in every request.
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"cpu": 0, "memory": 512 * 2**20}
# How often Tune runs a trial again, from its last checkpoint, after it failed: its process or
# node was lost (an error of the training itself fails again).
MAX_TRIAL_FAILURES = 1


def run_sweep(spec: JobSpec, env: JobEnv, *, use_gpu: bool) -> tune.ResultGrid:
    """Run every trial of the job; returns Tune's results (one per trial, errors included).
    Raises NodeLost when a trial lost its node and no live node can run it again."""
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, use_gpu=use_gpu), trial_resources(spec, use_gpu=use_gpu)
    )
    storage_path, storage_filesystem = env.ray_storage()
    scheduler = spec.sweep.scheduler if spec.sweep is not None else "fifo"
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(spec),
        tune_config=tune_config(spec),
        run_config=tune.RunConfig(
            name=f"{env.job_id}-sweep",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=tune.FailureConfig(max_failures=MAX_TRIAL_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[
                ReportStoppedTrials(epochs=spec.training.epochs, by=SCHEDULER_NAMES[scheduler]),
                FailWhereNoNodeFits(wait_s=env.node_wait_s),
            ],
        ),
    )
    return tuner.fit()


def trial_resources(spec: JobSpec, *, use_gpu: bool) -> dict[str, Any]:
    """What a trial's own process reserves: the worker's CPUs, GPU and custom resources when it
    trains itself (one worker, Train's local mode), which also puts it on a node that has them;
    else only its memory (its Train workers reserve the rest, and go where those are)."""
    resources = spec.resources
    if runs_locally(spec):
        return {
            "cpu": resources.cpus_per_worker,
            "gpu": 1 if use_gpu else 0,
            # Tune's resource dict takes custom resources under this key.
            "custom_resources": dict(resources.custom),
        }
    return TRIAL_DRIVER_RESOURCES


def search_space(spec: JobSpec) -> dict[str, Any]:
    """Tune's param_space: each swept field, by dotted path, as a Tune domain; a grid's
    repeats as a grid over their seeds."""
    sweep = spec.sweep
    if sweep is None:
        return {}
    space = {path: _domain(s) for path, s in sweep.parameters.items()}
    if sweep.repeats_by_seed():
        seed = spec.training.seed
        space[SEED_PATH] = tune.grid_search([seed + i for i in range(sweep.num_samples)])
    return space


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
        key = TrialKey(first_number=0)
        return tune.TuneConfig(trial_name_creator=key, trial_dirname_creator=key, reuse_actors=True)
    # Tune's variant generator numbers its trials from 0, its searchers (Optuna) from 1.
    key = TrialKey(first_number=1 if sweep.search == "optuna" else 0)
    scheduler = _scheduler(sweep, epochs=spec.training.epochs)
    return tune.TuneConfig(
        metric=f"val_{sweep.metric}",
        mode="max",
        search_alg=_search_algorithm(sweep, seed=spec.training.seed, scheduler=scheduler),
        scheduler=scheduler,
        num_samples=1 if sweep.repeats_by_seed() else sweep.num_samples,
        trial_name_creator=key,
        trial_dirname_creator=key,
        # A trial's process (with torch imported, its data loaded) takes the next trial, rather
        # than a new process starting for each: seconds a trial on a small job.
        reuse_actors=True,
    )


def _search_algorithm(sweep: SweepSpec, *, seed: int, scheduler: TrialScheduler) -> SearchAlgorithm:
    """The search, limited to ``max_concurrent_trials`` trials at once. (Tune ignores
    TuneConfig's limit when it is given a search algorithm, so the limit is set here; under
    successive halving, the scheduler keeps it, not counting trials paused at a rung.)"""
    if isinstance(scheduler, SuccessiveHalving):
        return HalvingVariantGenerator(scheduler, random_state=seed)
    if sweep.search == "optuna":
        return SearchGenerator(
            ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=sweep.max_concurrent_trials)
        )
    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials, random_state=seed)


# Under asha and halving, the best 1 in REDUCTION_FACTOR trials at a rung go on.
REDUCTION_FACTOR = 3


def first_rung(epochs: int) -> int:
    """The epochs every trial of an asha or halving sweep trains before it can be stopped: a
    quarter of them. A rung after epoch 1 stopped the grid's best TRADES trial (a large beta
    fits slowly, then overtakes; docs/benchmarks.md, "ASHA and successive halving")."""
    return max(1, epochs // 4)


def halving_rungs(epochs: int) -> tuple[int, ...]:
    """The epochs at which a halving sweep compares its trials: after a quarter of them, then
    after half. With the best third going on at each, a grid of 9 (or 27, 81...) trains 39% of
    the grid's epochs (1/4 + 1/3 x 1/4 + 1/9 x 1/2), and found the grid's best."""
    rungs = {first_rung(epochs), max(1, epochs // 2)}
    return tuple(sorted(e for e in rungs if e < epochs))


def _scheduler(sweep: SweepSpec, *, epochs: int) -> TrialScheduler:
    if sweep.scheduler == "halving":
        return SuccessiveHalving(
            rungs=halving_rungs(epochs),
            num_trials=sweep.num_trials(),
            max_concurrent=sweep.max_concurrent_trials,
            reduction_factor=REDUCTION_FACTOR,
        )
    if sweep.scheduler == "asha":
        # One past the last epoch: ASHA stops a trial that reaches max_t, and a trial that
        # trained to its end must still be evaluated on the test split after its last report.
        return ASHAScheduler(
            time_attr="epoch",
            max_t=epochs + 1,
            grace_period=first_rung(epochs),
            reduction_factor=REDUCTION_FACTOR,
        )
    return FIFOScheduler()


# Each scheduler as a trial's reason names it ("stopped early by ASHA after epoch 2 of 8").
SCHEDULER_NAMES = {"fifo": "FIFO", "asha": "ASHA", "halving": "successive halving"}


@dataclass(frozen=True)
class TrialKey:
    """A trial's key, the name the service knows it by: its place in the order the search made
    the trials, from 0 (``trial_0003``), the same when the sweep is restored."""

    first_number: int

    def __call__(self, trial: Trial) -> str:
        # Tune's experiment tag starts with the search's counter: "3_training.beta=6.0000".
        number = int(trial.experiment_tag.split("_", 1)[0]) - self.first_number
        return f"trial_{number:04d}"


class ReportStoppedTrials(tune.Callback):
    """Tells the service of trials the scheduler (``by``) ended early: they end without error
    before their last epoch, in a process Tune has stopped, so nothing else can say so.

    Tune saves its callbacks with the experiment's state, so this keeps nothing of the job's
    but its epochs: the job's environment (its worker token) is read when it posts."""

    def __init__(self, *, epochs: int, by: str) -> None:
        self.epochs = epochs
        self.by = by

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        last_epoch = (trial.last_result or {}).get("epoch", 0)
        if last_epoch < self.epochs:
            with closing(Reporter.for_job(JobEnv.from_environ())) as reporter:
                reporter.trial(
                    str(trial),  # the trial's name: its key (TrialKey)
                    config={},  # as the trial reported it (with the seed it was given)
                    status="stopped",
                    reason=f"stopped early by {self.by} after epoch {last_epoch} of {self.epochs}",
                )


class NodeLost(RuntimeError):
    """Trials that lost their node, which no live node has the resources to run again."""

    def __init__(self, trials: dict[str, str]) -> None:
        # trial key -> why
        self.trials = trials
        super().__init__("; ".join(f"{key}: {why}" for key, why in trials.items()))


class FailWhereNoNodeFits(tune.Callback):
    """Ends the sweep with NodeLost when a trial that failed (its node was lost) waits to run
    again and, for ``wait_s`` (the service's ``node_wait_s``), no live node has the resources
    it asks for: a custom resource (``resources.custom``) that only the lost node declared.
    Tune itself would wait for one forever (it only warns), with the job running and the
    trial shown running. A node that rejoins within ``wait_s`` runs it."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        # trial id -> since when (monotonic) it fits no live node
        self._stranded_since: dict[str, float] = {}

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        # A trial Tune runs again after a failure is pending with its failure counted.
        retried = [t for t in trials if t.status == Trial.PENDING and t.num_failures > 0]
        if not retried:
            self._stranded_since.clear()
            return
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        now = time.monotonic()
        lost: dict[str, str] = {}
        for trial in retried:
            factory = trial.placement_group_factory
            bundles: list[dict[str, float]] = factory.bundles if factory is not None else []
            unplaceable = [bundle for bundle in bundles if not _fits(bundle, nodes)]
            if not unplaceable:
                self._stranded_since.pop(trial.trial_id, None)
                continue
            since = self._stranded_since.setdefault(trial.trial_id, now)
            if now - since >= self.wait_s:
                wanted = ", ".join(f"{k}: {v:g}" for k, v in unplaceable[0].items() if v > 0)
                lost[str(trial)] = (  # the trial's name: its key (TrialKey)
                    "its node was lost, and no live node has the resources to run it again "
                    f"({wanted}) after {self.wait_s:.0f} s"
                )
        if lost:
            raise NodeLost(lost)


def _fits(bundle: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    """Whether some node's total resources hold the whole bundle."""
    return any(all(node.get(k, 0) >= v for k, v in bundle.items() if v > 0) for node in nodes)
