"""The search machinery on any objective: Ray Tune runs the trials, Optuna draws them as a
multi-objective searcher (``search/searcher.py``), a scheduler stops the hopeless ones
(``search/scheduler.py``), and ``search/pareto.py`` scores the outcome (front, hypervolume).

The SR search (``search/run.py``) and the LCBench benchmark (``benchmarks/bench_lcbench.py``) both
build their Tune run here, so a benchmark figure is a figure of the code that runs SR trials. For
your own objective: a trainable that calls ``search.compat.report`` once per rung with the rung,
the quality and the cost; a define-by-run space; then::

    from search import engine
    goal = engine.Objectives(quality="val_accuracy", cost="time", rung="epoch", budget=52)
    results = engine.tune_run(trainable, engine.make_searcher("tpe", space, goal, seed=0),
                              engine.make_scheduler("pareto", goal), num_samples=64,
                              name="mine", storage_path="/tmp/ray")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from search.config import StoppingRule  # the rule's settings, the SR config's early_stopping too

SCHEDULERS = ("none", "pareto", "moasha", "asha")


@dataclass(frozen=True)
class Objectives:
    """What the trials report and how far they go.

    Args:
        quality: result key maximised (PSNR, accuracy).
        cost: result key minimised (FLOPs, energy, training time).
        rung: result key counting a trial's progress (the training step, the epoch).
        budget: ``rung`` of a fully trained trial.
        first_rung: ``rung`` of a trial's first report (ASHA's grace period).
        unit: the quality's unit, for the scheduler's stop reasons ("dB" for PSNR).
    """

    quality: str
    cost: str
    rung: str
    budget: int
    first_rung: int = 1
    unit: str = ""


MOASHA = StoppingRule(rule="rank", min_rung=1, rung_factor=3.0, eta=3.0)  # Schmucker et al. 2021


def make_scheduler(name: str, goal: Objectives, rule: StoppingRule | None = None):
    """The Tune scheduler ``name`` (one of ``SCHEDULERS``), or None for "none" (every trial runs
    to the budget).

    "pareto" is ours with ``rule`` (default: ``StoppingRule()``); "moasha" is ours with MOASHA's
    rank promotion at eta 3 on rungs 1, 3, 9, ... (in reports); "asha" is Ray's single-metric
    ASHA on the quality alone, eta 3.
    """
    from search.scheduler import ParetoRungScheduler

    if name == "none":
        return None
    if name in ("pareto", "moasha"):
        r = (rule or StoppingRule()) if name == "pareto" else MOASHA
        return ParetoRungScheduler(
            goal.quality, goal.cost, goal.rung, r.min_rung, r.margin, r.rung_factor, r.rule, r.eta, goal.unit
        )
    if name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr=goal.rung,
            metric=goal.quality,
            mode="max",
            max_t=goal.budget,
            grace_period=goal.first_rung,
            reduction_factor=3,
        )
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")


def make_searcher(
    name: str, space: Callable, goal: Objectives, seed: int, startup_trials: int = 10, **storage
):
    """Optuna's sampler ``name`` (``search.searcher.SAMPLERS``) as Tune's searcher over ``space``;
    ``storage``: ``study_name`` and ``storage_dir`` to keep its study on disk."""
    from search.searcher import make_sampler, optuna_searcher

    return optuna_searcher(
        space,
        (goal.quality, goal.cost),
        goal.rung,
        goal.budget,
        make_sampler(name, seed, startup_trials),
        **storage,
    )


def tune_run(
    trainable,
    searcher,
    scheduler,
    num_samples: int,
    name: str,
    storage_path: str,
    max_concurrent: int = 2,
    callbacks: list | None = None,
    progress_reporter=None,
    verbose: int = 1,
):
    """One Ray Tune run of ``num_samples`` trials; returns Tune's ``ResultGrid``.

    A trial that crashes is recorded and the run goes on (``max_failures=0, fail_fast=False``), and
    so does one whose result lacks an objective (it ends failed: ``compat.tolerate_missing_metrics``).
    """
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search import compat

    compat.tolerate_missing_metrics()
    compat.quiet_state_copy_race()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
            scheduler=scheduler,
            num_samples=num_samples,
            reuse_actors=True,  # 3.7 s -> 0.25 s of overhead per trial (docs/benchmarks.md)
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            progress_reporter=progress_reporter,
            verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    return tuner.fit()
