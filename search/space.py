"""The search space, define-by-run for Optuna. It only draws values; it computes nothing."""

from __future__ import annotations

from typing import Any

from model.mambalitesr import ModelConfig, preset
from search.config import FloatRange, IntRange, Knob, SearchConfig, network_knobs


def _draw(trial, knob: Knob, r: IntRange | FloatRange, high: int | None = None):
    if knob.kind is float:
        return trial.suggest_float(knob.name, r.low, r.high, log=r.log)
    hi = min(r.high, high) if high is not None else r.high
    hi = max(r.low, r.low + ((hi - r.low) // r.step) * r.step)  # stay on the step grid
    return trial.suggest_int(knob.name, r.low, hi, step=r.step)


def define_space(trial, cfg: SearchConfig) -> dict[str, Any] | None:
    """Draw one trial's knobs (``search.config.KNOBS`` that the config gives a range). Rank is
    bounded by the inner width expand * embed_dim of its trial."""
    base = preset(cfg.base_model)
    drawn: dict[str, Any] = {}
    for knob, r in cfg.space.ranges():
        high = base.expand * drawn["embed_dim"] if knob.name == "rank" else None
        drawn[knob.name] = _draw(trial, knob, r, high)
    return None


def model_config(params: dict[str, Any], cfg: SearchConfig) -> ModelConfig:
    """The network a trial's params describe: the base preset with the drawn fields replaced."""
    return preset(cfg.base_model, **network_knobs(params))
