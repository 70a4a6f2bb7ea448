"""Early stopping that respects several objectives.

Two rules, applied at a trial's rungs (its validations, or a geometric subset of them):

- ``dominated`` (ours, the default): a trial is stopped only if a peer whose cost is no higher
  reached a better quality at the same rung: it is dominated among peers of equal or lower cost. A
  small, cheap student is compared only with students at least as cheap, so it is never stopped
  for being worse than an expensive one (single-metric ASHA would stop it, and it may well sit on
  the Pareto front).
- ``rank`` (MOASHA's promotion, Schmucker et al. 2021, in its asynchronous stopping form): the
  points recorded at the rung so far are ordered by non-dominated sorting, each front broken by an
  epsilon-net (the next point is the one farthest from those already taken); a trial continues
  only if it is in the best 1/eta of that order.

Rungs: the first decision is at the trial's ``min_rung``-th validation; with ``rung_factor`` 1,
every later validation is a rung, with ``rung_factor`` f > 1 only validations min_rung * f^k
(ASHA's geometric spacing: with min_rung 1 and f 3, validations 1, 3, 9, 27, ...).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.config import RULES  # the rules, defined beside their settings


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


def _beats(a: RungPoint, b: RungPoint) -> bool:
    """Pareto dominance of (quality up, cost down)."""
    return a.quality >= b.quality and a.cost <= b.cost and (a.quality > b.quality or a.cost < b.cost)


def rank_order(points: list[RungPoint]) -> list[RungPoint]:
    """``points`` best first: non-dominated fronts in turn, each ordered by an epsilon-net.

    Within a front the first point is the best in quality; each next one is the point farthest
    (Euclidean, objectives scaled to [0, 1] over ``points``) from those already taken, so the
    order spreads over the front instead of crowding one end of it.
    """

    def span(values):
        lo, hi = min(values), max(values)
        return lo, (hi - lo) or 1.0

    (q0, qs), (c0, cs) = span([p.quality for p in points]), span([p.cost for p in points])
    xy = {id(p): ((p.quality - q0) / qs, (p.cost - c0) / cs) for p in points}
    order, left = [], list(points)
    while left:
        front = [p for p in left if not any(_beats(o, p) for o in left)]
        left = [p for p in left if p not in front]
        taken = [max(front, key=lambda p: (p.quality, -p.cost))]
        front.remove(taken[0])
        while front:
            far = max(front, key=lambda p: min(math.dist(xy[id(p)], xy[id(t)]) for t in taken))
            taken.append(far)
            front.remove(far)
        order.extend(taken)
    return order


@dataclass(frozen=True)
class StopDecision:
    step: int  # the rung
    stopped: RungPoint
    peer: RungPoint | None  # the one that dominated it (rule "dominated")
    margin: float
    place: tuple[int, int] | None = None  # (its place, points at the rung) (rule "rank")
    eta: float = 3.0
    unit: str = ""  # the quality's ("dB" for PSNR)

    def reason(self, labels: dict[str, str] | None = None) -> str:
        """One sentence for the trial run, e.g. "at step 400, t01 C32 r4 a0.50 reached 28.10 dB at
        cost 0.31 (no more than this trial's 0.35) against this trial's 27.60 dB"."""
        unit = f" {self.unit}" if self.unit else ""
        if self.peer is None:
            place, n = self.place or (0, 0)
            return (
                f"at step {self.step}, this trial ({self.stopped.quality:.2f}{unit} at cost "
                f"{self.stopped.cost:.4g}) ranked {place} of {n} by non-dominated sorting; only the "
                f"best {max(1, math.ceil(n / self.eta))} (1/{self.eta:g}) continue"
            )
        peer = (labels or {}).get(self.peer.trial_id, self.peer.trial_id)
        margin = f" (margin {self.margin:g}{unit})" if self.margin else ""
        return (
            f"at step {self.step}, {peer} reached {self.peer.quality:.2f}{unit} at cost {self.peer.cost:.4g} "
            f"(no more than this trial's {self.stopped.cost:.4g}) against this trial's "
            f"{self.stopped.quality:.2f}{unit}{margin}"
        )


def is_rung(index: int, min_rung: int, rung_factor: float) -> bool:
    """Whether a trial's ``index``-th validation (from 1) is a rung where it can be stopped."""
    if index < min_rung:
        return False
    if rung_factor <= 1:
        return True
    k = round(math.log(index / min_rung, rung_factor))
    return any(math.ceil(min_rung * rung_factor**j - 1e-9) == index for j in (k - 1, k, k + 1) if j >= 0)


class ParetoRungScheduler(FIFOScheduler):
    """A Ray Tune scheduler applying one of ``RULES`` at each rung.

    Args:
        quality, cost: result keys (quality maximised, cost minimised).
        rung_key: result key whose value identifies the rung (the training step, the epoch).
        min_rung: number of validations a trial always gets before it can be stopped.
        margin: quality (in ``unit``) a peer must be better by (rule "dominated").
        rung_factor: spacing of the rungs after the first (1: every validation; see the module).
        rule: "dominated" or "rank".
        eta: the rank rule keeps the best 1/eta at each rung.
        unit: the quality's unit in the stop reasons ("dB" for PSNR; none by default).
    """

    def __init__(
        self,
        quality: str,
        cost: str,
        rung_key: str = "step",
        min_rung: int = 1,
        margin: float = 0.0,
        rung_factor: float = 1.0,
        rule: str = "dominated",
        eta: float = 3.0,
        unit: str = "",
    ):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.quality, self.cost, self.rung_key = quality, cost, rung_key
        self.min_rung, self.margin, self.rung_factor = min_rung, margin, rung_factor
        self.rule, self.eta, self.unit = rule, eta, unit
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
        index = self.rung_index[trial.trial_id]
        if result.get("done") or not is_rung(index, self.min_rung, self.rung_factor):
            return TrialScheduler.CONTINUE
        decision = self._decide(rung, point, peers)
        if decision is None:
            return TrialScheduler.CONTINUE
        self.stopped.append((trial.trial_id, rung))
        self.decisions[trial.trial_id] = decision
        return TrialScheduler.STOP

    def _decide(self, rung: int, point: RungPoint, peers: list[RungPoint]) -> StopDecision | None:
        if self.rule == "dominated":
            peer = dominating_peer(point, peers, self.margin)
            return None if peer is None else StopDecision(rung, point, peer, self.margin, unit=self.unit)
        order = rank_order(peers)
        place = order.index(point) + 1
        if place <= max(1, math.ceil(len(peers) / self.eta)):
            return None
        return StopDecision(rung, point, None, self.margin, (place, len(peers)), self.eta, self.unit)

    def reason(self, trial_id: str, labels: dict[str, str] | None = None) -> str | None:
        """Why ``trial_id`` was stopped (peers named by ``labels``), or None if it was not."""
        decision = self.decisions.get(trial_id)
        return decision.reason(labels) if decision else None

    def debug_string(self) -> str:
        return f"ParetoRungScheduler ({self.rule}): {len(self.stopped)} trials stopped early"
