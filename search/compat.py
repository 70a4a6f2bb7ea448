"""Every call into Ray Tune and Optuna that depends on their version, in one place.

The search uses Ray's public API elsewhere. What is here reaches into private attributes or into
APIs that moved between releases; it was written against the versions in ``TESTED`` (pinned in
pyproject.toml), and an upgrade should start by reading this file and running the search tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
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


# Tune saves its state by writing ``.<uuid4>-tmp-...`` beside the file, then renaming it
# (ray/tune/utils/util.py ``_atomic_save``); a background copy of the folder that lists the temporary
# file before the rename fails on it with FileNotFoundError.
_VANISHED_TEMP = re.compile(r"FileNotFoundError.*\.[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-tmp-", re.S)
STATE_COPY_RACE = (
    "Ray Tune: a copy of the experiment state met a temporary file that a save renamed meanwhile; "
    "the next copy carries the saved state"
)


class _VanishedTempFile(logging.Filter):
    """Turns Ray's traceback for that race into one INFO line; every other record passes as is."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        if _VANISHED_TEMP.search(text):
            record.msg, record.args, record.exc_info, record.exc_text = STATE_COPY_RACE, None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


# the two places Ray 2.60 logs a failed copy of the driver's state folder: the syncer when it starts
# the next copy, and Tune's experiment state when it waits for one
STATE_COPY_LOGGERS = ("ray.train._internal.syncer", "ray.tune.execution.experiment_state")


def quiet_state_copy_race() -> None:
    """Say Tune's harmless state-copy race in one line instead of a traceback in the driver's
    stderr: Ray retries nothing, but its next copy of the folder (at the next save, and at the end
    of the run) copies the renamed file, so nothing is lost. Idempotent."""
    for name in STATE_COPY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _VanishedTempFile) for f in logger.filters):
            logger.addFilter(_VanishedTempFile())


def trial_identity() -> tuple[str, str]:
    """(trial id, trial name) of the trial this worker runs."""
    from ray import tune

    ctx = tune.get_context()
    return ctx.get_trial_id(), ctx.get_trial_name()


class CtrlC:
    """Tells a Ctrl-C during ``Tuner.fit()`` apart from a fit that returned with fewer results
    (a damaged experiment state restored fewer trials): Tune catches SIGINT itself and returns
    either way, and only says so in its log.

    Inside ``during_fit()``, Tune's own SIGINT handler is off (``TUNE_DISABLE_SIGINT_HANDLER``)
    and this one records the press, then sends the process SIGUSR1, on which Ray 2.60's
    ``tune.run`` stops the same way (saving its state); a second press is the usual
    KeyboardInterrupt. Until Tune has put its SIGUSR1 handler in place, SIGUSR1 raises
    KeyboardInterrupt here instead of ending the process.
    """

    def __init__(self) -> None:
        self.pressed = False

    @contextlib.contextmanager
    def during_fit(self):
        def pressed(sig, frame):
            self.pressed = True
            signal.signal(signal.SIGINT, previous_int)
            os.kill(os.getpid(), signal.SIGUSR1)

        def not_yet(sig, frame):
            raise KeyboardInterrupt

        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous_int = signal.signal(signal.SIGINT, pressed)
        previous_usr1 = signal.signal(signal.SIGUSR1, not_yet)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGUSR1, previous_usr1)


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
