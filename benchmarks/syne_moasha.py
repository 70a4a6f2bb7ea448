"""Syne Tune's own MOASHA as a Ray Tune scheduler: the real peer of our scheduler's rank rule.

Syne Tune (``pip install --no-deps syne-tune==0.16.0 dill``: its MOASHA needs only numpy, pandas
and dill, while its full requirements pull xgboost's CUDA wheels) ships its schedulers with its
own tuning loop. Here only its stopping decisions are used: each trial Tune starts is added to
Syne Tune's ``MOASHA`` and each result is passed to its ``on_trial_result``; STOP stops the trial.
The searcher, the trials and the scoring stay ours, so the comparison is of the stopping rules
alone. Syne Tune minimises every metric: the quality goes in negated.
"""

from __future__ import annotations

from datetime import datetime

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.engine import Objectives

NEG_QUALITY = "neg_quality"


class SyneTuneMOASHA(FIFOScheduler):
    """Syne Tune's ``MOASHA`` (non-dominated sort with its epsilon-net, one bracket, eta 3,
    rungs at ``first_rung`` * 3^k) deciding for Ray Tune."""

    def __init__(self, goal: Objectives, seed: int, reduction_factor: float = 3):
        super().__init__()
        try:
            from syne_tune.backend.trial_status import Trial
            from syne_tune.optimizer.scheduler import SchedulerDecision
            from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA
        except ImportError as exc:
            raise ImportError(
                f"the syne-moasha scheduler needs Syne Tune ({exc}): "
                "pip install --no-deps syne-tune==0.16.0 dill"
            ) from None
        self._trial, self._stop = Trial, SchedulerDecision.STOP
        self.goal = goal
        self.inner = MOASHA(
            config_space={},
            metrics=[NEG_QUALITY, goal.cost],
            do_minimize=True,
            time_attr=goal.rung,
            max_t=goal.budget,
            grace_period=goal.first_rung,
            reduction_factor=reduction_factor,
            random_seed=seed,
        )
        self.trials: dict[str, object] = {}  # Tune's trial id -> Syne Tune's Trial

    def on_trial_add(self, tune_controller, trial) -> None:
        t = self._trial(trial_id=len(self.trials), config=dict(trial.config), creation_time=datetime.now())
        self.trials[trial.trial_id] = t
        self.inner.on_trial_add(t)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        g = self.goal
        if any(k not in result for k in (g.quality, g.cost, g.rung)) or trial.trial_id not in self.trials:
            return TrialScheduler.CONTINUE
        if result[g.rung] >= g.budget:  # the trial ends here anyway
            return TrialScheduler.CONTINUE
        metrics = {g.rung: result[g.rung], NEG_QUALITY: -float(result[g.quality])}
        metrics[g.cost] = float(result[g.cost])
        action = self.inner.on_trial_result(self.trials[trial.trial_id], metrics)
        return TrialScheduler.STOP if action == self._stop else TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"Syne Tune MOASHA: {self.inner.num_stopped} trials stopped"
