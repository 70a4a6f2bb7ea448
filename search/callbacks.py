"""The Ray Tune callback through which the driver writes each trial's verdict as the trial ends.

A module of its own because it imports ray (search/study.py does not) and because Tune pickles its
callbacks into the experiment state, which ``Tuner.restore`` reads back: the class must be
importable by name.
"""

from __future__ import annotations

from ray.tune import Callback

from search.study import Study, error_line, trial_label


class VerdictCallback(Callback):
    """``Study.close_trial`` for each trial Tune ends, even when Ray killed the trial's process.

    Args:
        round: the learning loop's round (it is part of the trials' run names).
        scheduler: the ``ParetoRungScheduler`` whose decision gives an early stop's reason, or None.
        objectives: result keys a trial's last result must hold as finite numbers; a trial that
            ends without one is recorded as failed (as the searcher tells Optuna).
    """

    def __init__(self, study: Study, round: int, scheduler=None, objectives: tuple[str, ...] = ()):
        self.study, self.round, self.scheduler = study, round, scheduler
        self.objectives = objectives

    def on_trial_complete(self, iteration, trials, trial, **info):
        reason = None
        if getattr(self.scheduler, "reason", None) is not None:
            labels = {t.trial_id: trial_label(i, t.config, self.round) for i, t in enumerate(trials, 1)}
            reason = self.scheduler.reason(trial.trial_id, labels)
        self._close(trials, trial, reason=reason)

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            error = error_line(trial.get_error())
        except Exception:  # the error file is gone or unreadable; the worker tagged the cause
            error = "the trial raised (its error.txt is in the Ray trial folder)"
        self._close(trials, trial, error=error)

    def _close(self, trials, trial, **verdict) -> None:
        number = next((i for i, t in enumerate(trials, 1) if t.trial_id == trial.trial_id), None)
        self.study.close_trial(
            trial.trial_id,
            trial.last_result,
            params=trial.config,
            round=self.round,
            number=number,
            objectives=self.objectives,
            **verdict,
        )
