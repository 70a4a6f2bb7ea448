"""Can the Ray cluster hold one trial at all? Checked after ray.init, before the teacher or a trial.

Ray queues a task or trial whose resource request no node can hold and waits for such a node
forever (Tune warns once a minute; nothing fails). A local Ray never grows, so the search fails at
once. A cluster's autoscaler may add a node: it is asked for one (it adds nodes for pending
requests, not for a driver that only looks) and given ``WAIT_S`` seconds, or as many as the
environment variable ``MAMBALITESR_RESOURCE_WAIT_S`` says, to bring one up.
"""

from __future__ import annotations

import logging
import math
import os
import time

log = logging.getLogger(__name__)

WAIT_ENV = "MAMBALITESR_RESOURCE_WAIT_S"
WAIT_S = 60.0  # enough for a node that is already booting; a cold cloud node needs WAIT_ENV raised
POLL_S = 2.0
KNOBS = {"CPU": ("cpus_per_trial", "--cpus-per-trial"), "GPU": ("gpus_per_trial", "--gpus-per-trial")}


def fit_problem(cpus: float, gpus: float, nodes: list[dict]) -> str | None:
    """Why no alive node can hold one trial's request (None if one can).

    Args:
        cpus, gpus: one trial's request, as given to Ray (fractions allowed).
        nodes: ``ray.nodes()``; each node's ``Resources`` are its totals, busy or not.
    """
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    asked = {key: value for key, value in (("CPU", cpus), ("GPU", gpus)) if value > 0}
    if any(all(res.get(key, 0.0) >= value for key, value in asked.items()) for res in alive):
        return None
    # name what no node has at all; if each fits somewhere but never together, name both
    short = [key for key, value in asked.items() if all(res.get(key, 0.0) < value for res in alive)]
    together = not short
    short = short or list(asked)
    want = " and ".join(f"{asked[key]:g} {key}" for key in short) + (" together" if together else "")
    largest = max(alive, key=lambda res: (res.get("GPU", 0.0), res.get("CPU", 0.0)), default={})
    has = f"{largest.get('CPU', 0.0):g} CPU, {largest.get('GPU', 0.0):g} GPU"
    knobs = " / ".join(f"{KNOBS[key][0]} ({KNOBS[key][1]})" for key in short)
    return (
        f"no node of this Ray cluster can hold one trial's {want} "
        f"({len(alive)} alive node{'s' if len(alive) != 1 else ''}, the largest has {has}): "
        f"lower {knobs} or add a node that has {'them' if len(short) > 1 else 'it'}"
    )


def cluster_wait_s() -> float:
    """Seconds to wait for an autoscaler: ``$MAMBALITESR_RESOURCE_WAIT_S`` or ``WAIT_S``."""
    text = os.environ.get(WAIT_ENV, "").strip()
    if not text:
        return WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{WAIT_ENV} must be a number of seconds, 0 or more, got {text!r}")
    return value


def trial_fit_problem(cpus: float, gpus: float, *, local: bool, poll_s: float = POLL_S) -> str | None:
    """Why the connected Ray cluster cannot hold one trial (None if it can).

    Args:
        local: Ray was started by this process and cannot grow: no waiting. Otherwise the
            autoscaler is asked for a node and given ``cluster_wait_s()`` to add it.
    """
    import ray

    problem = fit_problem(cpus, gpus, ray.nodes())
    if problem is None or local:
        return problem
    try:
        wait_s = cluster_wait_s()
    except ValueError as exc:
        return str(exc)
    from ray.autoscaler.sdk import request_resources

    bundle = {key: value for key, value in (("CPU", cpus), ("GPU", gpus)) if value > 0}
    log.info("waiting up to %g s for the autoscaler to add a node: %s", wait_s, problem)
    request_resources(bundles=[bundle])
    try:
        deadline = time.monotonic() + wait_s
        while problem is not None and time.monotonic() < deadline:
            time.sleep(poll_s)
            problem = fit_problem(cpus, gpus, ray.nodes())
    finally:
        request_resources(bundles=[])  # the trials' own requests hold the node from here on
    return problem and f"{problem} (waited {wait_s:g} s for the autoscaler)"
