"""What a job's trials add up to, as users read it: the best trial, chosen on validation data,
and the clean/robust trade-off with its Pareto front, repeats grouped as mean and std.

Selection follows the field's method: the best trial is the one with the best *validation*
score (the sweep's metric at the trial's best epoch); test numbers are reported, never used to
choose. The robust axis of the trade-off is AutoAttack's accuracy where the job ran AutoAttack,
PGD's otherwise, and says which.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from service.models import Job, Trial, TrialStatus
from workers.spec import SEED_PATH, JobSpec


@dataclass(frozen=True)
class RobustAxis:
    """Which robust accuracy a job's results rank and plot: its column, the attack, epsilon."""

    metric: str
    attack: str
    epsilon: float


@dataclass(frozen=True)
class TradeoffPoint:
    """One configuration: its trials (repeats with their own seeds) and their mean accuracies,
    with the sample standard deviation over repeats (None for a single trial)."""

    config: dict[str, Any]
    trials: list[str]
    clean_acc: float
    robust_acc: float
    clean_acc_std: float | None
    robust_acc_std: float | None
    on_front: bool


# The evaluation of a spec that says nothing of it: what JobSpec resolves by default.
DEFAULT_EVALUATION: dict[str, Any] = JobSpec(name="default").model_dump(mode="json")["evaluation"]


def robust_axis(job: Job) -> RobustAxis:
    # A spec stored by an older version may lack the section or some of its fields (the jobs of
    # migration 0001 kept whatever was posted): those read as their defaults.
    evaluation = DEFAULT_EVALUATION | (job.spec.get("evaluation") or {})
    epsilon = float(evaluation["epsilon"])
    if evaluation.get("autoattack"):
        return RobustAxis("autoattack_acc", "AutoAttack (standard)", epsilon)
    restarts = evaluation["restarts"]
    attack = f"PGD-{evaluation['attack_steps']}" + (f" x{restarts}" if restarts > 1 else "")
    return RobustAxis("robust_acc", attack, epsilon)


def selection_metric(job: Job) -> str:
    """The validation score a job's best trial is chosen by: the sweep's metric."""
    sweep = job.spec.get("sweep") or {}
    return "val_clean_acc" if sweep.get("metric") == "clean_acc" else "val_robust_acc"


def best_trial(job: Job) -> Trial | None:
    """The succeeded trial with the best validation score (then the other validation accuracy;
    the first of equals wins). An evaluate job's best is its one trial, once it succeeded."""
    finished = [trial for trial in job.trials if trial.status == TrialStatus.SUCCEEDED]
    if job.spec.get("kind") == "evaluate":
        return finished[0] if finished else None
    metric = selection_metric(job)
    other = "val_clean_acc" if metric == "val_robust_acc" else "val_robust_acc"
    scored = [trial for trial in finished if getattr(trial, metric) is not None]
    return max(scored, key=lambda t: (getattr(t, metric), getattr(t, other) or 0.0), default=None)


def tradeoff(job: Job) -> tuple[RobustAxis, list[TradeoffPoint]]:
    """Clean against robust accuracy (on the job's robust axis) of every configuration with
    final results, in order of clean accuracy, each marked whether it is on the Pareto front
    (no other is at least as good on both and better on one)."""
    axis = robust_axis(job)
    groups: dict[str, list[Trial]] = {}
    for trial in job.trials:
        if trial.clean_acc is not None and getattr(trial, axis.metric) is not None:
            groups.setdefault(_config_key(trial.config), []).append(trial)
    means = {
        key: (
            _mean([t.clean_acc for t in trials]),
            _mean([getattr(t, axis.metric) for t in trials]),
        )
        for key, trials in groups.items()
    }
    points = [
        TradeoffPoint(
            config={k: v for k, v in trials[0].config.items() if k != SEED_PATH},
            trials=[trial.key for trial in trials],
            clean_acc=means[key][0],
            robust_acc=means[key][1],
            clean_acc_std=_std([t.clean_acc for t in trials]),
            robust_acc_std=_std([getattr(t, axis.metric) for t in trials]),
            on_front=not any(_dominates(other, means[key]) for other in means.values()),
        )
        for key, trials in groups.items()
    ]
    return axis, sorted(points, key=lambda p: (p.clean_acc, p.robust_acc, p.trials))


def _config_key(config: dict[str, Any]) -> str:
    """A configuration without the seed its repeats differ by."""
    return json.dumps({k: v for k, v in config.items() if k != SEED_PATH}, sort_keys=True)


def _mean(values: list[Any]) -> float:
    return statistics.fmean(float(v) for v in values)


def _std(values: list[Any]) -> float | None:
    return statistics.stdev(float(v) for v in values) if len(values) > 1 else None


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and a != b
