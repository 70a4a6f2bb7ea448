"""Early stopping that respects several objectives.

At each rung (a validation), a trial is stopped only if peers whose cost is no higher reached a
better PSNR at the same rung: it is dominated among peers of equal or lower cost. A small, cheap
student is compared only with students at least as cheap, so it is never stopped for being worse
than an expensive one (single-metric ASHA would stop it, and it may well sit on the Pareto front).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ray.tune.schedulers import FIFOScheduler, TrialScheduler


@dataclass(frozen=True)
class RungPoint:
    trial_id: str
    quality: float  # higher is better
    cost: float  # lower is better


def dominated_at_rung(candidate: RungPoint, peers: list[RungPoint], margin: float = 0.0) -> bool:
    """True when some other peer costs no more and has quality higher by more than ``margin``."""
    return any(
        p.trial_id != candidate.trial_id
        and p.cost <= candidate.cost
        and p.quality > candidate.quality + margin
        for p in peers
    )


class ParetoRungScheduler(FIFOScheduler):
    """A Ray Tune scheduler applying ``dominated_at_rung`` at each reported validation.

    Args:
        quality, cost: result keys (quality maximised, cost minimised).
        rung_key: result key whose value identifies the rung (the training step).
        min_rung: number of rungs a trial always gets before it can be stopped.
        margin: PSNR (dB) a peer must be better by.
    """

    def __init__(
        self, quality: str, cost: str, rung_key: str = "step", min_rung: int = 1, margin: float = 0.0
    ):
        super().__init__()
        self.quality, self.cost, self.rung_key = quality, cost, rung_key
        self.min_rung, self.margin = min_rung, margin
        self.rungs: dict[int, list[RungPoint]] = defaultdict(list)
        self.rung_index: dict[str, int] = defaultdict(int)
        self.stopped: list[tuple[str, int]] = []  # (trial_id, rung step) of every stop decision

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.quality not in result or self.cost not in result or self.rung_key not in result:
            return TrialScheduler.CONTINUE
        rung = int(result[self.rung_key])
        point = RungPoint(trial.trial_id, float(result[self.quality]), float(result[self.cost]))
        peers = self.rungs[rung]
        peers.append(point)
        self.rung_index[trial.trial_id] += 1
        if result.get("done") or self.rung_index[trial.trial_id] <= self.min_rung - 1:
            return TrialScheduler.CONTINUE
        if dominated_at_rung(point, peers, self.margin):
            self.stopped.append((trial.trial_id, rung))
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"ParetoRungScheduler: {len(self.stopped)} trials stopped early"
