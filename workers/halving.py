"""Synchronous successive halving (Jamieson & Talwalkar, 2016), the ``halving`` scheduler of a
sweep: every trial trains to a rung (an epoch), waits there, paused with its last checkpoint,
until every trial of the sweep has reached it, and then only the best of them go on; the rest
stop. At the last rung the survivors train to the end.

Against ASHA (``asha``): ASHA decides each trial as it arrives at a rung, so the first trials
to arrive go on for want of others to compare with. On a sweep of a few trials, two at a time,
those few are most of the sweep, and it saves little (docs/benchmarks.md, "ASHA and successive
halving against the grid"). Waiting costs some wall time: while the last trials reach a rung,
the slots of those waiting stay idle.

It needs every trial of the sweep known before the first rung is decided (a grid, or random
search's samples), so the spec refuses it with Optuna, whose trials follow the results.

    SuccessiveHalving      the Tune scheduler: pauses trials at rungs, promotes the best
    HalvingVariantGenerator  Tune's variant generator whose limit on trials at once counts
                           only the trials that train, not those waiting at a rung

Its defaults (the rungs, the share that goes on) are the sweep's: ``workers.sweep``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController


class SuccessiveHalving(FIFOScheduler):
    """Tune's scheduler for synchronous successive halving by ``time_attr`` (the epoch).

    ``num_trials`` is the sweep's whole count: a rung is decided once that many trials were
    added and every one still in it has reported there or ended. ``max_concurrent`` trials
    train at once; a paused trial does not count. Each rung keeps the best
    ``len // reduction_factor`` (at least one) of the trials that reached it, by the metric
    at the rung's epoch; ties go to the earlier trial.

    Tune's calls, as its TuneController makes them: PAUSE saves the trial (it stays RUNNING
    until the save is done, then is PAUSED); a trial it runs again after a lost process gets
    ``on_trial_error`` (already ERROR) and then ``on_trial_add`` again, from its checkpoint."""

    # Every result is seen: a buffered one could carry a trial past its rung.
    _supports_buffered_results = False

    def __init__(
        self,
        *,
        rungs: tuple[int, ...],
        num_trials: int,
        max_concurrent: int,
        reduction_factor: int,
        time_attr: str = "epoch",
    ) -> None:
        super().__init__()
        assert list(rungs) == sorted(set(rungs)), "rungs are increasing epochs"
        self.rungs = rungs
        self.num_trials = num_trials
        self.max_concurrent = max_concurrent
        self.reduction_factor = reduction_factor
        self.time_attr = time_attr
        self.sign = 1.0  # -1.0 to minimise: set, with the metric, by the sweep's TuneConfig
        self.trials: list[Trial] = []  # in the order they were added
        # trial id -> the index of the rung it trains towards (len(rungs): to the end)
        self.rung_of: dict[str, int] = {}
        # per rung: trial id -> its metric there
        self.scores: list[dict[str, float]] = [{} for _ in rungs]
        self.decided: list[bool] = [False for _ in rungs]
        self.ended: set[str] = set()  # completed, stopped or failed

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if not super().set_search_properties(metric, mode, **spec):
            return False
        self.sign = -1.0 if mode == "min" else 1.0
        return True

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        if trial.trial_id in self.rung_of:  # run again after a lost process: it keeps its place
            return
        self.trials.append(trial)
        self.rung_of[trial.trial_id] = 0

    def on_trial_result(
        self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]
    ) -> str:
        rung = self.rung_of[trial.trial_id]
        epoch = result.get(self.time_attr)
        if rung >= len(self.rungs) or epoch is None or epoch < self.rungs[rung]:
            return TrialScheduler.CONTINUE
        if self.decided[rung]:  # stopped there; a result already on its way when it was
            return TrialScheduler.STOP
        self.scores[rung][trial.trial_id] = self.sign * float(result[self.metric])
        if not self._rung_complete(rung):
            return TrialScheduler.PAUSE
        return self._decide(tune_controller, rung, current=trial)

    def on_trial_complete(
        self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]
    ) -> None:
        self._end(tune_controller, trial)

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        # Already ERROR: Tune runs it again (FailureConfig) and adds it again; else it ended.
        if trial.status != Trial.ERROR:
            self._end(tune_controller, trial)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._end(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        for trial in self.trials:
            if trial.status == Trial.PENDING and not self._waits(trial):
                return trial
        if not self.has_room():
            return None
        # Paused and no longer waiting: promoted at its rung. (One promoted while its pause is
        # still saving is RUNNING until the save is done, and is resumed after.)
        for trial in self.trials:
            if trial.status == Trial.PAUSED and not self._waits(trial):
                return trial
        return None

    def has_room(self) -> bool:
        """Whether another trial may train: fewer than ``max_concurrent`` train now. (A trial
        that Tune runs again after a lost process starts at once, room or not.)"""
        training = [
            t
            for t in self.trials
            if t.status in (Trial.PENDING, Trial.RUNNING) and not self._waits(t)
        ]
        return len(training) < self.max_concurrent

    def _waits(self, trial: Trial) -> bool:
        """Whether the trial reached its rung and waits for the rung to be decided (paused, or
        RUNNING while its pause is saved)."""
        rung = self.rung_of[trial.trial_id]
        return (
            rung < len(self.rungs)
            and trial.trial_id in self.scores[rung]
            and not self.decided[rung]
            and trial.trial_id not in self.ended
        )

    def debug_string(self) -> str:
        rungs = zip(self.rungs, self.scores, strict=True)
        reached = ", ".join(f"epoch {epoch}: {len(scores)}" for epoch, scores in rungs)
        waiting = sum(self._waits(t) for t in self.trials)
        return f"Successive halving: trials at each rung ({reached}), {waiting} waiting"

    def _rung_complete(self, rung: int) -> bool:
        if len(self.trials) < self.num_trials:
            return False
        return all(
            t.trial_id in self.scores[rung] or t.trial_id in self.ended
            for t in self.trials
            if self.rung_of[t.trial_id] == rung
        )

    def _end(self, tune_controller: TuneController, trial: Trial) -> None:
        if trial.trial_id in self.ended:
            return
        self.ended.add(trial.trial_id)
        # A trial that ended before its rung may have been the one the rung waited for.
        rung = self.rung_of[trial.trial_id]
        if rung < len(self.rungs) and not self.decided[rung] and self._rung_complete(rung):
            self._decide(tune_controller, rung, current=None)

    def _decide(self, tune_controller: TuneController, rung: int, *, current: Trial | None) -> str:
        """Promote the rung's best trials and stop the others; returns what ``current`` (the
        trial whose result completed the rung) does."""
        self.decided[rung] = True
        scores = self.scores[rung]
        ranked = sorted(
            (t for t in self.trials if t.trial_id in scores and t.trial_id not in self.ended),
            key=lambda t: -scores[t.trial_id],  # sorted() is stable: ties keep trial order
        )
        keep = max(1, len(ranked) // self.reduction_factor)
        action = TrialScheduler.CONTINUE
        for place, trial in enumerate(ranked):
            if place < keep:
                self.rung_of[trial.trial_id] = rung + 1  # resumed by choose_trial_to_run
                continue
            if trial is current:
                action = TrialScheduler.STOP
            else:
                tune_controller.stop_trial(trial)
        return action


class HalvingVariantGenerator(BasicVariantGenerator):
    """Tune's variant generator (grid and random search) for a halving sweep: it adds the next
    trial only while the scheduler has room, so its limit on trials at once counts the trials
    that train. (Its own ``max_concurrent`` counts every trial not ended, paused ones too: the
    first trials to wait at a rung would stop the sweep.)"""

    def __init__(self, scheduler: SuccessiveHalving, *, random_state: int) -> None:
        super().__init__(random_state=random_state)
        self.scheduler = scheduler

    def next_trial(self) -> Trial | None:
        if not self.scheduler.has_room():
            return None
        trial: Trial | None = super().next_trial()  # (Tune's is untyped)
        return trial

    def get_state(self) -> dict[str, Any] | bool:
        # Tune saves the searcher's state with the experiment; the scheduler is not the
        # searcher's to save.
        state: dict[str, Any] | bool = super().get_state()
        if isinstance(state, dict):
            state.pop("scheduler", None)
        return state
