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


def dominating_peer(candidate: RungPoint, peers: list[RungPoint], margin: float = 0.0) -> RungPoint | None:
    """The best of the other peers that cost no more and have quality higher by more than
    ``margin``, or None when no peer does."""
    better = [
        p
        for p in peers
        if p.trial_id != candidate.trial_id
        and p.cost <= candidate.cost
        and p.quality > candidate.quality + margin
    ]
    return max(better, key=lambda p: (p.quality, -p.cost), default=None)


def dominated_at_rung(candidate: RungPoint, peers: list[RungPoint], margin: float = 0.0) -> bool:
    """True when some other peer costs no more and has quality higher by more than ``margin``."""
    return dominating_peer(candidate, peers, margin) is not None


@dataclass(frozen=True)
class StopDecision:
    step: int  # the rung
    stopped: RungPoint
    peer: RungPoint  # the one that dominated it
    margin: float

    def reason(self, labels: dict[str, str] | None = None) -> str:
        """One sentence for the trial run, e.g. "at step 400, t01 C32 r4 a0.50 reached 28.10 dB at
        cost 0.31 (no more than this trial's 0.35) against this trial's 27.60 dB"."""
        peer = (labels or {}).get(self.peer.trial_id, self.peer.trial_id)
        margin = f" (margin {self.margin:g} dB)" if self.margin else ""
        return (
            f"at step {self.step}, {peer} reached {self.peer.quality:.2f} dB at cost {self.peer.cost:.4g} "
            f"(no more than this trial's {self.stopped.cost:.4g}) against this trial's "
            f"{self.stopped.quality:.2f} dB{margin}"
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
        self.decisions: dict[str, StopDecision] = {}  # why each was stopped

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
        peer = dominating_peer(point, peers, self.margin)
        if peer is not None:
            self.stopped.append((trial.trial_id, rung))
            self.decisions[trial.trial_id] = StopDecision(rung, point, peer, self.margin)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def reason(self, trial_id: str, labels: dict[str, str] | None = None) -> str | None:
        """Why ``trial_id`` was stopped (peers named by ``labels``), or None if it was not."""
        decision = self.decisions.get(trial_id)
        return decision.reason(labels) if decision else None

    def debug_string(self) -> str:
        return f"ParetoRungScheduler: {len(self.stopped)} trials stopped early"
