"""The search space, define-by-run for Optuna. It only draws values; it computes nothing."""

from __future__ import annotations

from typing import Any

from model.mambalitesr import ModelConfig, preset
from search.config import FloatRange, IntRange, SearchConfig


def _int(trial, name: str, r: IntRange, high: int | None = None) -> int:
    hi = min(r.high, high) if high is not None else r.high
    hi = max(r.low, r.low + ((hi - r.low) // r.step) * r.step)  # stay on the step grid
    return trial.suggest_int(name, r.low, hi, step=r.step)


def _float(trial, name: str, r: FloatRange) -> float:
    return trial.suggest_float(name, r.low, r.high, log=r.log)


def define_space(trial, cfg: SearchConfig) -> dict[str, Any] | None:
    """Draw one trial's knobs. Rank is bounded by the inner width expand * embed_dim of its trial."""
    space, base = cfg.space, preset(cfg.base_model)
    embed_dim = _int(trial, "embed_dim", space.embed_dim)
    _int(trial, "rank", space.rank, high=base.expand * embed_dim)
    _float(trial, "alpha", space.alpha)
    if space.n_groups:
        _int(trial, "n_groups", space.n_groups)
    if space.blocks_per_group:
        _int(trial, "blocks_per_group", space.blocks_per_group)
    if space.lr:
        _float(trial, "lr", space.lr)
    return None


def model_config(params: dict[str, Any], cfg: SearchConfig) -> ModelConfig:
    """The network a trial's params describe: the base preset with the drawn fields replaced."""
    fields = {k: params[k] for k in ("embed_dim", "rank", "n_groups", "blocks_per_group") if k in params}
    return preset(cfg.base_model, **fields)
