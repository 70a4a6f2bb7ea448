"""Optuna as Ray Tune's multi-objective searcher, told the truth about unfinished trials.

Ray's OptunaSearch reports a trial stopped early by the scheduler to Optuna as COMPLETE with its
early values, and a crashed trial that had reported something as COMPLETE too. Those values would
pull the sampler towards half-trained points. Here a trial counts as COMPLETE only when it reached
the full budget (``search.study.fully_trained``: its last result's rung is the budget) with every
objective a finite number; stopped trials are PRUNED (Optuna's multi-objective samplers skip them),
crashed ones and ones whose last result lacks an objective FAIL. (Ray would ``tell`` a missing
objective as None, which Optuna refuses: Ray logs a warning and the Optuna trial stays RUNNING for
ever, which TPE then treats as a bad point.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers.nsgaii import UniformCrossover
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search import compat
from search.config import SEARCHERS as SAMPLERS  # one list: the config checks it too
from search.study import fully_trained, missing_objectives

log = logging.getLogger(__name__)


class BudgetAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, told COMPLETE only for trials that reached ``budget`` on ``rung_key``
    with every objective given."""

    def __init__(self, *args, budget: int, rung_key: str = "step", **kwargs):
        super().__init__(*args, **kwargs)
        self.budget, self.rung_key = budget, rung_key

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        missing = missing_objectives(result, self.metric)
        if error or missing:
            if missing and not error and result:
                log.warning("trial %s ended without %s: told to Optuna as FAIL", trial_id, ", ".join(missing))
            compat.tell_unfinished(self, trial_id, TrialState.FAIL)
            return
        if not fully_trained((result or {}).get(self.rung_key), self.budget):
            compat.tell_unfinished(self, trial_id, TrialState.PRUNED)
            return
        super().on_trial_complete(trial_id, result, error)


class StoppingAwareNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II whose generations advance under early stopping.

    Optuna's NSGA-II closes a generation once ``population_size`` of its trials are COMPLETE. With
    early stopping most trials end PRUNED, so a generation would take several times its size to
    close and the search would stay in generation 0, which is random search. Here every finished
    trial (COMPLETE or PRUNED) counts towards closing its generation; parents are still chosen
    among the COMPLETE ones only, and a generation with fewer than two of them to breed from
    draws at random.
    """

    def __init__(self, **kwargs):
        self._crossover = kwargs.setdefault("crossover", UniformCrossover())
        super().__init__(**kwargs)

    def get_trial_generation(self, study, trial) -> int:
        key = self._get_generation_key()
        generation = trial.system_attrs.get(key)
        if generation is not None:
            return generation
        finished = study._get_trials(deepcopy=False, states=[TrialState.COMPLETE, TrialState.PRUNED])
        generations = [t.system_attrs.get(key, -1) for t in finished]
        newest = max(generations, default=0)
        generation = newest + 1 if generations.count(newest) >= self.population_size else max(newest, 0)
        study._storage.set_trial_system_attr(trial._trial_id, key, generation)
        return generation

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        generation = self.get_trial_generation(study, trial)
        if len(self.get_parent_population(study, generation)) < self._crossover.n_parents:
            return {}
        return super().sample_relative(study, trial, search_space)


def make_sampler(name: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler ``name`` (one of ``SAMPLERS``); ``startup_trials``: random trials before
    TPE and the GP model, the population of NSGA-II."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials)
    if name == "nsga2":
        return StoppingAwareNSGAIISampler(seed=seed, population_size=startup_trials)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"searcher must be one of {SAMPLERS}, got {name!r}")


def optuna_searcher(
    space: Callable,
    objectives: tuple[str, str],
    rung_key: str,
    budget: int,
    sampler: optuna.samplers.BaseSampler,
    study_name: str | None = None,
    storage_dir: Path | None = None,
) -> BudgetAwareOptunaSearch:
    """The searcher over a define-by-run ``space`` for (quality maximised, cost minimised).

    With ``storage_dir`` its Optuna study lives in ``storage_dir/optuna.db`` and survives a
    restart; without, in memory.
    """
    storage = None
    if storage_dir is not None:
        storage = optuna.storages.RDBStorage(f"sqlite:///{(storage_dir / 'optuna.db').resolve()}")
    return BudgetAwareOptunaSearch(
        space=space,
        metric=list(objectives),
        mode=["max", "min"],
        sampler=sampler,
        study_name=study_name,
        storage=storage,
        budget=budget,
        rung_key=rung_key,
    )
