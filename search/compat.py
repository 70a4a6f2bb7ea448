"""Every call into Ray Tune and Optuna that depends on their version, in one place.

The search uses Ray's public API elsewhere. What is here reaches into private attributes or into
APIs that moved between releases; it was written against the versions in ``TESTED`` (pinned in
pyproject.toml), and an upgrade should start by reading this file and running the search tests.
"""

from __future__ import annotations

from typing import Any

TESTED = {"ray": "2.60", "optuna": "5.0"}  # the minor versions the tests ran with


def report(metrics: dict[str, float]) -> None:
    """Send one result of the running trial to Tune (``ray.tune.report`` since Ray 2.7's new API)."""
    from ray import tune

    tune.report(metrics)


def tolerate_missing_metrics() -> None:
    """Let a trial's result lack an objective without ending the whole Tune run.

    Ray 2.60 checks every result against the searcher's metrics in the driver and raises a
    TuneError that stops every trial when one is missing (a failed energy read, say). With the
    check off, the searcher (``search.searcher``) tells Optuna FAIL for such a trial and the
    verdict records it failed, while the other trials go on. Read by Tune at each result.
    """
    import os

    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"


def trial_identity() -> tuple[str, str]:
    """(trial id, trial name) of the trial this worker runs."""
    from ray import tune

    ctx = tune.get_context()
    return ctx.get_trial_id(), ctx.get_trial_name()


def trial_statuses(results: Any) -> list[str]:
    """Tune's status of every trial of a finished ``Tuner.fit()``: ``ResultGrid`` lists only the
    trials that produced a result, so Ray 2.60 exposes the others only on its private analysis."""
    return [t.status for t in results._experiment_analysis.trials]


def interrupted(results: Any, num_samples: int) -> bool:
    """True when ``Tuner.fit()`` returned before every trial ended (Tune catches SIGINT itself)."""
    statuses = trial_statuses(results)
    return len(statuses) < num_samples or any(s not in ("TERMINATED", "ERROR") for s in statuses)


def tell_unfinished(searcher: Any, trial_id: str, state: Any) -> bool:
    """Close an OptunaSearch trial as ``state`` (PRUNED, FAIL) with no values; False when Ray's
    searcher does not know the trial or has already closed it.

    Ray's ``OptunaSearch.on_trial_complete`` would tell Optuna COMPLETE (or, for a missing value,
    leave the trial RUNNING); its trial map and study are private (``_ot_trials``, ``_ot_study``,
    ``_completed_trials`` in Ray 2.60).
    """
    if trial_id in searcher._completed_trials or trial_id not in searcher._ot_trials:
        return False
    searcher._ot_study.tell(searcher._ot_trials[trial_id], None, state=state)
    searcher._completed_trials.add(trial_id)
    return True


def optuna_study(searcher: Any) -> Any:
    """The ``optuna.Study`` behind Ray's OptunaSearch (private ``_ot_study`` in Ray 2.60)."""
    return searcher._ot_study
