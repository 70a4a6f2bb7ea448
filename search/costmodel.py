"""A cost model: from a student's architecture to what one device type measured for it.

The search needs a cost for every trial, but the device measures only the Pareto candidates, and
only after they are trained. So the measurements so far are fitted by a small linear model over
architecture features, and the search minimises its prediction; every round of measurements
refits it. With a handful of points a linear model with few, physically motivated features is what
the data can support:

- ``flops_g``: GFLOPs at the 64x64 deployment unit (``model.count_flops``): the arithmetic;
- ``scan_width_k``: layers x inner width x d_state / 1000: the selective scan's state per token,
  which sets its memory traffic (the scan is memory-bound: docs/benchmarks.md, "Selective scan");
- ``layers``: Mamba layers; per-layer fixed costs (kernel launches, norms) on a GPU.

Ridge regression on standardised features (a small penalty keeps 2-4 points from exploding the
weights); the intercept is not penalised. The error reported is the leave-one-out mean absolute
error: each measured point predicted by the model fitted on the others. Fewer than two points: no
model, and the caller falls back to FLOPs (and says so).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge_agent import contract
from model.complexity import count_flops
from model.mambalitesr import ModelConfig

# search objective -> the agent's metric it predicts (edge_agent.contract.EDGE_METRICS)
TARGETS = {
    "edge_energy": contract.ENERGY,
    "edge_latency": contract.LATENCY_MEAN,  # the figure selection compares
    "edge_power": contract.POWER,
}
FEATURES = ("flops_g", "scan_width_k", "layers")
RIDGE = 1e-3  # on standardised features: negligible once there are more points than features


def features(cfg: ModelConfig) -> dict[str, float]:
    layers = cfg.n_groups * cfg.blocks_per_group
    return {
        "flops_g": count_flops(cfg, 64, 64).gflops,
        "scan_width_k": layers * cfg.expand * cfg.embed_dim * cfg.d_state / 1000.0,
        "layers": float(layers),
    }


@dataclass(frozen=True)
class CostModel:
    target: str  # the agent's metric, e.g. energy_mj_per_image
    device: str
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    n: int  # measurements it was fitted on
    loo_mae: float  # leave-one-out mean absolute error, in the target's unit; nan below 3 points

    def predict_features(self, f: dict[str, float]) -> float:
        x = (np.array([f[k] for k in FEATURES]) - np.array(self.mean)) / np.array(self.scale)
        return float(self.intercept + x @ np.array(self.coef))

    def predict(self, cfg: ModelConfig) -> float:
        return self.predict_features(features(cfg))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        return cls(**{**d, **{k: tuple(d[k]) for k in ("mean", "scale", "coef")}})


def _solve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0  # a feature constant over the data carries no information
    z = (x - mean) / scale
    y0 = y.mean()
    coef = np.linalg.solve(z.T @ z + RIDGE * len(y) * np.eye(z.shape[1]), z.T @ (y - y0))
    return coef, float(y0), mean, scale


def fit(points: list[tuple[dict[str, float], float]], target: str, device: str) -> CostModel | None:
    """Fit on (features, measured value) pairs; None with fewer than two points."""
    if len(points) < 2:
        return None
    x = np.array([[f[k] for k in FEATURES] for f, _ in points], dtype=float)
    y = np.array([v for _, v in points], dtype=float)
    coef, intercept, mean, scale = _solve(x, y)
    loo = float("nan")
    if len(y) >= 3:
        errors = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            c, b, m, s = _solve(x[keep], y[keep])
            errors.append(abs(b + ((x[i] - m) / s) @ c - y[i]))
        loo = float(np.mean(errors))
    return CostModel(
        target=target,
        device=device,
        mean=tuple(map(float, mean)),
        scale=tuple(map(float, scale)),
        coef=tuple(map(float, coef)),
        intercept=intercept,
        n=len(y),
        loo_mae=loo,
    )
