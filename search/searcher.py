"""Optuna as Ray Tune's multi-objective searcher, told the truth about unfinished trials.

Ray's OptunaSearch reports a trial stopped early by the scheduler to Optuna as COMPLETE with its
early values, and a crashed trial that had reported something as COMPLETE too. Those values would
pull the sampler towards half-trained points. Here a trial counts as COMPLETE only when it reached
the full budget (``search.study.fully_trained``: its last result's step is the budget); stopped
trials are PRUNED (Optuna's multi-objective samplers skip them) and crashed ones FAIL.
"""

from __future__ import annotations

import functools
from pathlib import Path

import optuna
from ray.tune.search.optuna import OptunaSearch

from search import compat
from search.config import SearchConfig
from search.space import define_space
from search.study import QUALITY, QUALITY_MODE, fully_trained


class BudgetAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, told COMPLETE only for trials that trained ``iterations`` steps."""

    def __init__(self, *args, iterations: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.iterations = iterations

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not fully_trained((result or {}).get("step"), self.iterations):
            state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
            compat.tell_unfinished(self, trial_id, state)
            return
        super().on_trial_complete(trial_id, result, error)


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    if cfg.searcher == "tpe":
        return optuna.samplers.TPESampler(
            seed=cfg.seed, multivariate=True, n_startup_trials=cfg.startup_trials
        )
    if cfg.searcher == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.startup_trials)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def make_searcher(cfg: SearchConfig, study_name: str, storage_dir: Path) -> BudgetAwareOptunaSearch:
    """The searcher, its study kept in ``storage_dir/optuna.db`` so that it survives a restart."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{(storage_dir / 'optuna.db').resolve()}")
    return BudgetAwareOptunaSearch(
        space=functools.partial(define_space, cfg=cfg),
        metric=[QUALITY, cfg.cost],
        mode=[QUALITY_MODE, "min"],
        sampler=make_sampler(cfg),
        study_name=study_name,
        storage=storage,
        seed=cfg.seed,
        iterations=cfg.training.iterations,
    )
