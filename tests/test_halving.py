"""The successive-halving scheduler (workers/halving.py) driven as Ray Tune's TuneController
drives it, call for call, with Tune's own Trial objects: the orders a real sweep shows only
sometimes (a promoted trial whose pause is still saving; a trial run again after its process
was lost). The sweep on a real Ray cluster is tests/test_ray_jobs.py's."""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from workers.halving import SuccessiveHalving

METRIC = "val_robust_acc"


class Controller:
    """The one call the scheduler makes of Tune's TuneController, as Tune makes it: a PAUSED or
    PENDING trial stopped is removed from the scheduler, a RUNNING one completed."""

    def __init__(self, scheduler: SuccessiveHalving) -> None:
        self.scheduler = scheduler
        self.stopped: list[Trial] = []

    def stop_trial(self, trial: Trial) -> None:
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.scheduler.on_trial_remove(self, trial)  # type: ignore[arg-type]
        else:
            self.scheduler.on_trial_complete(self, trial, {})  # type: ignore[arg-type]
        trial.set_status(Trial.TERMINATED)
        self.stopped.append(trial)


def halving(*, num_trials: int, max_concurrent: int) -> tuple[SuccessiveHalving, Controller]:
    scheduler = SuccessiveHalving(
        rungs=(1, 2), num_trials=num_trials, max_concurrent=max_concurrent, reduction_factor=3
    )
    assert scheduler.set_search_properties(METRIC, "max")
    return scheduler, Controller(scheduler)


def add(scheduler: SuccessiveHalving, controller: Controller) -> Trial:
    """Tune adds a trial (PENDING) and starts it."""
    trial = Trial("__fake", stub=True)
    scheduler.on_trial_add(controller, trial)  # type: ignore[arg-type]
    trial.set_status(Trial.RUNNING)
    return trial


def report(
    scheduler: SuccessiveHalving, controller: Controller, trial: Trial, epoch: int, acc: float
) -> str:
    result: dict[str, Any] = {"epoch": epoch, METRIC: acc}
    return scheduler.on_trial_result(controller, trial, result)  # type: ignore[arg-type]


def test_every_trial_waits_at_the_rung_then_the_best_third_resumes() -> None:
    scheduler, controller = halving(num_trials=3, max_concurrent=1)
    first = add(scheduler, controller)
    assert report(scheduler, controller, first, 1, 0.5) == TrialScheduler.PAUSE
    first.set_status(Trial.PAUSED)
    assert scheduler.has_room()  # a paused trial does not count
    second = add(scheduler, controller)
    assert not scheduler.has_room()
    assert report(scheduler, controller, second, 1, 0.7) == TrialScheduler.PAUSE
    second.set_status(Trial.PAUSED)
    assert scheduler.choose_trial_to_run(controller) is None  # type: ignore[arg-type]

    last = add(scheduler, controller)
    # The last to arrive completes the rung; it is the worst, so it stops, and so does the
    # first, paused; the second (the best of three) is resumed.
    assert report(scheduler, controller, last, 1, 0.3) == TrialScheduler.STOP
    assert controller.stopped == [first]
    controller.stop_trial(last)  # as Tune carries out a STOP
    assert scheduler.choose_trial_to_run(controller) is second  # type: ignore[arg-type]
    second.set_status(Trial.RUNNING)
    # Alone at the next rung: it goes on to the end.
    assert report(scheduler, controller, second, 2, 0.8) == TrialScheduler.CONTINUE
    assert report(scheduler, controller, second, 3, 0.9) == TrialScheduler.CONTINUE


def test_a_promoted_trial_still_saving_its_pause_is_resumed_once_paused() -> None:
    scheduler, controller = halving(num_trials=2, max_concurrent=2)
    best, other = add(scheduler, controller), add(scheduler, controller)
    # PAUSE saves the trial first: it stays RUNNING until the save is done.
    assert report(scheduler, controller, best, 1, 0.9) == TrialScheduler.PAUSE
    assert report(scheduler, controller, other, 1, 0.1) == TrialScheduler.STOP
    controller.stop_trial(other)
    assert scheduler.choose_trial_to_run(controller) is None  # type: ignore[arg-type]
    best.set_status(Trial.PAUSED)  # the save is done
    assert scheduler.choose_trial_to_run(controller) is best  # type: ignore[arg-type]


def test_a_trial_run_again_after_its_process_was_lost_keeps_its_place() -> None:
    scheduler, controller = halving(num_trials=3, max_concurrent=1)
    first = add(scheduler, controller)
    assert report(scheduler, controller, first, 1, 0.5) == TrialScheduler.PAUSE
    first.set_status(Trial.PAUSED)
    lost = add(scheduler, controller)
    # As Tune runs a trial again (FailureConfig): ERROR, on_trial_error, then PENDING and
    # on_trial_add of the same trial.
    lost.set_status(Trial.ERROR)
    scheduler.on_trial_error(controller, lost)  # type: ignore[arg-type]
    lost.set_status(Trial.PENDING)
    scheduler.on_trial_add(controller, lost)  # type: ignore[arg-type]
    lost.set_status(Trial.RUNNING)
    assert scheduler.trials == [first, lost]
    # Two trials of three at the rung: it waits for the third.
    assert report(scheduler, controller, lost, 1, 0.9) == TrialScheduler.PAUSE
    lost.set_status(Trial.PAUSED)
    last = add(scheduler, controller)
    assert report(scheduler, controller, last, 1, 0.1) == TrialScheduler.STOP
    assert controller.stopped == [first]
    controller.stop_trial(last)
    assert scheduler.choose_trial_to_run(controller) is lost  # type: ignore[arg-type]


def test_a_trial_that_fails_for_good_before_the_rung_is_not_waited_for() -> None:
    scheduler, controller = halving(num_trials=2, max_concurrent=2)
    waiting, failing = add(scheduler, controller), add(scheduler, controller)
    assert report(scheduler, controller, waiting, 1, 0.5) == TrialScheduler.PAUSE
    waiting.set_status(Trial.PAUSED)
    # A final failure: Tune calls on_trial_error while the trial is still RUNNING.
    scheduler.on_trial_error(controller, failing)  # type: ignore[arg-type]
    failing.set_status(Trial.ERROR)
    assert scheduler.choose_trial_to_run(controller) is waiting  # type: ignore[arg-type]
