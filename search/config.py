"""Search configuration: YAML files map onto frozen dataclasses; unknown keys and bad values are
errors that name the key. ``search/configs/default.yaml`` and ``smoke.yaml`` hold the defaults.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_agent import contract
from model.mambalitesr import PRESETS

CONFIG_DIR = Path(__file__).parent / "configs"
SEARCHERS = ("tpe", "nsga2", "random")
# flops_g, params: computed; edge_*: predicted by search/costmodel.py from what the device measured
COSTS = ("flops_g", "params", "edge_energy", "edge_latency", "edge_power")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high or self.step <= 0:
            raise ConfigError(f"needs 0 < low <= high and step > 0, got {self}")


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high or (self.log and self.low <= 0):
            raise ConfigError(f"needs low <= high (and low > 0 on a log scale), got {self}")


@dataclass(frozen=True)
class SpaceConfig:
    embed_dim: IntRange = IntRange(16, 48, 8)  # C
    rank: IntRange = IntRange(1, 32)  # r, further bounded by expand * C for each trial
    alpha: FloatRange = FloatRange(0.0, 1.0)  # distillation weight
    n_groups: IntRange | None = None  # optional knobs; None keeps the base model's value
    blocks_per_group: IntRange | None = None
    lr: FloatRange | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha.low <= self.alpha.high <= 1.0:
            raise ConfigError(f"space.alpha must lie in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class TrainingConfig:
    iterations: int = 600  # steps per fully trained trial
    val_every: int = 100  # a validation is a rung of the early-stopping rule
    batch_size: int = 16
    patch_size: int = 64
    lr: float = 2e-4
    train_data: tuple[str, ...] = ()  # folders reachable from every worker; empty: built-in images
    val_data: tuple[str, ...] = ()
    val_max_images: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "val_every", "batch_size", "patch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"training.{name} must be positive, got {getattr(self, name)}")
        if self.val_every > self.iterations:
            raise ConfigError("training.val_every must not exceed training.iterations")


@dataclass(frozen=True)
class TeacherConfig:
    checkpoint: str | None = None  # path or MLflow URI of a trained teacher; None: train one per study
    preset: str = "teacher"
    iterations: int = 1000
    batch_size: int = 16
    patch_size: int = 64

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"teacher.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.iterations <= 0 or self.batch_size <= 0 or self.patch_size <= 0:
            raise ConfigError("teacher.iterations, batch_size and patch_size must be positive")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    enabled: bool = True
    min_rung: int = 1  # never stop a trial before this many validations
    margin_db: float = 0.0  # a peer must be better by more than this to count


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = contract.REGISTERED_MODEL
    devices: tuple[str, ...] = ("orin-nano",)  # edge.<device>.status=pending is set for each
    input_size: int = 64  # static ONNX input (1, 3, n, n)

    def __post_init__(self) -> None:
        for d in self.devices:
            try:
                contract.status_tag(d)
            except ValueError as exc:
                raise ConfigError(f"registry.devices: {exc}") from exc


@dataclass(frozen=True)
class LoopConfig:
    """Rounds of search -> registration -> measurement on the device -> refit of the cost model."""

    rounds: int = 1
    device: str = "orin-nano"  # the device type whose measurements steer the search and selection
    wait_timeout_s: float = 1800.0  # how long each round waits for the agent's measurements
    local_agent: bool = False  # start `edge-agent run` here (ONNX Runtime on this machine's CPU)
    agent_args: tuple[str, ...] = ()  # extra `edge-agent run` arguments, e.g. ["--duration-s", "3"]
    select: bool = False  # pick the champion at the end (search/select.py)
    select_rule: str = "knee"

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.wait_timeout_s < 0:
            raise ConfigError("loop.rounds must be at least 1 and loop.wait_timeout_s non-negative")
        try:
            contract.status_tag(self.device)
        except ValueError as exc:
            raise ConfigError(f"loop.device: {exc}") from exc
        if self.select_rule not in ("knee", "best-psnr"):
            raise ConfigError(f"loop.select_rule must be knee or best-psnr, got {self.select_rule!r}")


@dataclass(frozen=True)
class SearchConfig:
    experiment: str = contract.EXPERIMENT
    tracking_uri: str = "sqlite:///mlflow.db"
    address: str | None = None  # Ray cluster address; None starts a local Ray
    num_samples: int = 16  # trials
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    searcher: str = "tpe"
    startup_trials: int = 10  # random trials before TPE models (Optuna's default); NSGA-II's population
    seed: int = 0
    storage_dir: str = "outputs/search"  # the driver's files: study state, the Optuna database, reports
    ray_storage: str | None = None  # Ray Tune's results; on a multi-machine cluster an s3:// or NFS path
    base_model: str = "student"  # preset supplying every model field the space does not set
    cost: str = "flops_g"  # the objective minimised beside PSNR
    space: SpaceConfig = field(default_factory=SpaceConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if self.startup_trials < 2:
            raise ConfigError(f"startup_trials must be at least 2, got {self.startup_trials}")
        if self.num_samples <= 0 or self.max_concurrent <= 0:
            raise ConfigError("num_samples and max_concurrent must be positive")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("cpus_per_trial must be positive and gpus_per_trial non-negative")
        if self.searcher not in SEARCHERS:
            raise ConfigError(f"searcher must be one of {SEARCHERS}, got {self.searcher!r}")
        if self.cost not in COSTS:
            raise ConfigError(f"cost must be one of {COSTS}, got {self.cost!r}")
        if self.base_model not in PRESETS:
            raise ConfigError(f"base_model must be one of {sorted(PRESETS)}, got {self.base_model!r}")
        if not self.experiment:
            raise ConfigError("experiment must not be empty")
        problem = contract.uri_credential_problem(self.tracking_uri)
        if problem:
            raise ConfigError(f"tracking_uri: {problem}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp``; nested dataclasses built recursively."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 2e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A ``cls`` dataclass from a mapping; an unknown key or a wrong type names the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key(s) {unknown}{where}; known: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}: {exc}" if prefix else str(exc)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Read a YAML config (default: search/configs/default.yaml) and apply dotted-key overrides."""
    path = Path(path) if path else CONFIG_DIR / "default.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return build(SearchConfig, data)
