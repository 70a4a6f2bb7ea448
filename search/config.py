"""Search configuration: YAML files map onto frozen dataclasses; unknown keys and bad values are
errors that name the key. ``search/configs/default.yaml`` and ``smoke.yaml`` hold the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_agent import argtypes, contract
from edge_agent.errors import UsageError
from model.config import PRESETS, preset

CONFIG_DIR = Path(__file__).parent / "configs"
SEARCHERS = ("tpe", "nsga2", "random", "gp")  # Optuna samplers (search/searcher.py)
RULES = ("dominated", "rank")  # the scheduler's stopping rules (search/scheduler.py)
# flops_g, params: computed; edge_*: predicted by search/costmodel.py from what the device measured
COSTS = ("flops_g", "params", "edge_energy", "edge_latency", "edge_power")
COST_UNITS = {  # what a cost counts, for tables and pages
    "flops_g": "GFLOPs per image",
    "params": "parameters",
    "edge_energy": "mJ per image",
    "edge_latency": "ms",
    "edge_power": "mW",
}


class ConfigError(UsageError, ValueError):
    """A configuration that cannot run; the message names the key."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.detail = key, message

    def under(self, prefix: str) -> ConfigError:
        """The same error seen one level up: ``iterations`` becomes ``training.iterations``."""
        return ConfigError(self.detail, f"{prefix}.{self.key}" if self.key else prefix)


def num(default: float, *, ge: float | None = None, gt: float | None = None, le: float | None = None):
    """A numeric field with its bounds; every number is also checked for being finite."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


class Checked:
    """Base of the config dataclasses: numbers are finite and inside the bounds given by ``num``;
    subclasses add the rules that tie fields together in ``check()``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"must be a finite number, got {value}", f.name)
            bounds = f.metadata
            if not bounds or value is None:
                continue
            if bounds["ge"] is not None and value < bounds["ge"]:
                raise ConfigError(f"must be at least {bounds['ge']}, got {value}", f.name)
            if bounds["gt"] is not None and value <= bounds["gt"]:
                raise ConfigError(f"must be greater than {bounds['gt']}, got {value}", f.name)
            if bounds["le"] is not None and value > bounds["le"]:
                raise ConfigError(f"must be at most {bounds['le']}, got {value}", f.name)
        self.check()

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class IntRange(Checked):
    low: int = num(1, ge=1)
    high: int = num(1, ge=1)
    step: int = num(1, ge=1)

    def check(self) -> None:
        if self.low > self.high:
            raise ConfigError(f"needs low <= high, got low {self.low}, high {self.high}")


@dataclass(frozen=True)
class FloatRange(Checked):
    low: float = 0.0
    high: float = 1.0
    log: bool = False

    def check(self) -> None:
        if not self.low <= self.high or (self.log and self.low <= 0):
            raise ConfigError(
                f"needs low <= high (and low > 0 on a log scale), got low {self.low}, high {self.high}"
            )


@dataclass(frozen=True)
class Knob:
    """One knob the search may draw. The space, the trial's name and typed params, the network a
    trial trains, the tables and Tune's progress table all read this table (``KNOBS``): adding a
    knob is a row here and its range in ``SpaceConfig`` (and, if it changes the network, a
    ``ModelConfig`` field of the same name)."""

    name: str  # the Optuna parameter, the MLflow param, the SpaceConfig field
    short: str  # its prefix in a trial's name: C32 r4 a0.60
    column: str  # its column in the tables
    kind: type  # int or float
    fmt: str  # how names and tables write its value
    network: bool  # a ModelConfig field: it changes the network, and so its cost
    always: bool  # drawn in every space; the others only where the config gives a range

    def value(self, raw: Any) -> Any:
        """The knob's value typed again (MLflow keeps params as strings)."""
        return self.kind(float(raw)) if self.kind is int else self.kind(raw)

    def show(self, raw: Any) -> str:
        return format(self.value(raw), self.fmt)

    def param(self, raw: Any) -> str:
        """Its MLflow param: an int as it is, a float to 4 significant digits, so the runs table
        reads 0.6028, not 0.6027633760716439 (the trial's config artifact keeps every digit)."""
        value = self.value(raw)
        return str(value) if self.kind is int else f"{value:.4g}"


KNOBS = (
    Knob("embed_dim", "C", "C", int, "d", network=True, always=True),
    Knob("rank", "r", "r", int, "d", network=True, always=True),  # at most expand * C
    Knob("alpha", "a", "alpha", float, ".2f", network=False, always=True),  # distillation weight
    Knob("n_groups", "g", "groups", int, "d", network=True, always=False),
    Knob("blocks_per_group", "b", "blocks", int, "d", network=True, always=False),
    Knob("lr", "lr", "lr", float, ".0e", network=False, always=False),
)


def knob(name: str) -> Knob:
    return next(k for k in KNOBS if k.name == name)


def knob_names() -> tuple[str, ...]:
    return tuple(k.name for k in KNOBS)


def knobs_of(params: dict[str, Any]) -> dict[str, Any]:
    """The knobs among ``params`` (a trial's config, or its run's string params), typed."""
    return {k.name: k.value(params[k.name]) for k in KNOBS if k.name in params}


def knob_columns(knob_sets: list[dict[str, Any]]) -> list[Knob]:
    """The knobs a table of these trials shows: the three always drawn, and any other one drawn."""
    return [k for k in KNOBS if k.always or any(k.name in knobs for knobs in knob_sets)]


def knob_params(params: dict[str, Any]) -> dict[str, str]:
    """The knobs among ``params`` as a trial run's MLflow params (``Knob.param``)."""
    return {k.name: k.param(params[k.name]) for k in KNOBS if k.name in params}


def network_knobs(params: dict[str, Any]) -> dict[str, Any]:
    """The knobs among ``params`` that are ModelConfig fields, typed."""
    return {k.name: k.value(params[k.name]) for k in KNOBS if k.network and k.name in params}


def knob_label(params: dict[str, Any]) -> str:
    """A trial's knobs in a few characters: ``C32 r4 a0.60``, then the optional knobs it drew
    (``g2 b3 lr2e-04``); a missing one of the three that are always drawn shows as ``?``."""
    parts = []
    for k in KNOBS:
        if k.name in params:
            parts.append(f"{k.short}{k.show(params[k.name])}")
        elif k.always:
            parts.append(f"{k.short}?")
    return " ".join(parts)


@dataclass(frozen=True)
class SpaceConfig(Checked):
    """A range per knob of ``KNOBS``, by the same names; an optional knob's None keeps the base
    model's value (or the training's learning rate)."""

    embed_dim: IntRange = IntRange(16, 48, 8)  # C
    rank: IntRange = IntRange(1, 32)  # r, further bounded by expand * C for each trial
    alpha: FloatRange = FloatRange(0.0, 1.0)  # distillation weight
    n_groups: IntRange | None = None
    blocks_per_group: IntRange | None = None
    lr: FloatRange | None = None

    def ranges(self) -> list[tuple[Knob, IntRange | FloatRange]]:
        """The knobs this space draws, in the table's order, with their ranges."""
        return [(k, getattr(self, k.name)) for k in KNOBS if getattr(self, k.name, None) is not None]

    def check(self) -> None:
        if not 0.0 <= self.alpha.low <= self.alpha.high <= 1.0:
            raise ConfigError(f"must lie in [0, 1], got {self.alpha}", "alpha")
        if self.lr is not None and self.lr.low <= 0:
            raise ConfigError(f"must be positive, got low {self.lr.low}", "lr")


INITS = ("auto", "teacher", "scratch")  # training.init


@dataclass(frozen=True)
class TrainingConfig(Checked):
    iterations: int = num(600, ge=1)  # steps per fully trained trial
    val_every: int = num(100, ge=1)  # a validation is a rung of the early-stopping rule
    batch_size: int = num(16, ge=1)
    patch_size: int = num(64, ge=1)
    lr: float = num(2e-4, gt=0)
    train_data: tuple[str, ...] = ()  # folders reachable from every worker; empty: built-in images
    val_data: tuple[str, ...] = ()
    val_max_images: int = num(0, ge=0)  # 0: all
    # where students' weights start: teacher (picked from the study's teacher, model/inherit.py,
    # in its topology), scratch, or auto: teacher when every student of the space fits inside the
    # teacher, else scratch with the reason (inherited students learn faster: docs/benchmarks.md)
    init: str = "auto"

    def check(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"must be one of {INITS}, got {self.init!r}", "init")
        if self.val_every > self.iterations:
            raise ConfigError(
                f"must not exceed iterations ({self.iterations}), got {self.val_every}", "val_every"
            )


@dataclass(frozen=True)
class TeacherConfig(Checked):
    checkpoint: str | None = None  # path or MLflow URI of a trained teacher; None: train one per study
    preset: str = "teacher"
    iterations: int = num(1000, ge=1)
    batch_size: int = num(16, ge=1)
    patch_size: int = num(64, ge=1)

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"must be one of {sorted(PRESETS)}, got {self.preset!r}", "preset")


@dataclass(frozen=True)
class StoppingRule(Checked):
    """Our scheduler's settings (search/scheduler.py explains each): the SR search's
    ``early_stopping`` and the rule any objective's Tune run takes (search/engine.py). The defaults
    are the ones the LCBench benchmark chose (docs/benchmarks.md)."""

    rule: str = "dominated"  # dominated: stopped when a peer as cheap is better; rank: MOASHA's rule
    min_rung: int = num(2, ge=1)  # never stop a trial before this many validations (chosen on LCBench)
    rung_factor: float = num(1.0, ge=1)  # 1: every later validation is a rung; f: min_rung * f^k only
    margin: float = num(0.0, ge=0)  # a peer must be better by more than this (the quality's unit: dB)
    eta: float = num(3.0, gt=1)  # rule rank: the best 1/eta at a rung continue

    def check(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"must be one of {RULES}, got {self.rule!r}", "rule")


@dataclass(frozen=True)
class EarlyStoppingConfig(StoppingRule):
    """``early_stopping``: our scheduler's rule (``StoppingRule``), and whether it runs at all."""

    enabled: bool = True


@dataclass(frozen=True)
class RegistryConfig(Checked):
    model_name: str = contract.REGISTERED_MODEL
    devices: tuple[str, ...] = ("orin-nano",)  # edge.<device>.status=pending is set for each
    input_size: int = num(64, ge=1)  # static ONNX input (1, 3, n, n)
    register: bool = True  # false: the front is reported, but nothing is exported or registered
    # false: no float16 check (a second trace of each candidate); versions are marked fp32-only,
    # for devices that run float32 anyway, such as ONNX Runtime on a CPU
    fp16: bool = True

    def check(self) -> None:
        if not self.model_name:
            raise ConfigError("must not be empty", "model_name")
        for d in self.devices:
            try:
                contract.status_tag(d)
            except ValueError as exc:
                raise ConfigError(str(exc), "devices") from exc


@dataclass(frozen=True)
class LoopConfig(Checked):
    """Rounds of search -> registration -> measurement on the device -> refit of the cost model."""

    rounds: int = num(1, ge=1)
    device: str = "orin-nano"  # the device type whose measurements steer the search and selection
    wait_timeout_s: float = num(1800.0, ge=0)  # how long each round waits for the agent's measurements
    local_agent: bool = False  # start `edge-agent run` here (ONNX Runtime on this machine's CPU)
    agent_args: tuple[str, ...] = ()  # extra `edge-agent run` arguments, e.g. ["--duration-s", "3"]
    select: bool = False  # pick the champion at the end (search/selection.py)
    select_rule: str = "knee"

    def check(self) -> None:
        try:
            contract.status_tag(self.device)
        except ValueError as exc:
            raise ConfigError(str(exc), "device") from exc
        if self.select_rule not in ("knee", "best-psnr"):
            raise ConfigError(f"must be knee or best-psnr, got {self.select_rule!r}", "select_rule")
        if self.agent_args and not self.local_agent:
            raise ConfigError(
                "are only used with loop.local_agent: true (set it, or drop them)", "agent_args"
            )


@dataclass(frozen=True)
class FinalizeConfig(Checked):
    """Retraining of the front's candidates at full length before they are registered."""

    iterations: int = num(0, ge=0)  # 0: register the trial's own (short) training
    # true: each candidate goes on from its trial's last weights (it trains the trial's steps plus
    # these); false: it starts again as its trial did
    from_trial: bool = True


@dataclass(frozen=True)
class SearchConfig(Checked):
    experiment: str = contract.EXPERIMENT
    tracking_uri: str = "sqlite:///mlflow.db"
    address: str | None = None  # Ray cluster address; None starts a local Ray
    num_samples: int = num(16, ge=1)  # trials
    max_concurrent: int = num(2, ge=1)
    cpus_per_trial: float = num(1.0, gt=0)
    gpus_per_trial: float = num(0.0, ge=0)
    searcher: str = "random"  # TPE and NSGA-II did not beat it on LCBench (docs/benchmarks.md)
    startup_trials: int = num(
        10, ge=2
    )  # random trials before TPE models (Optuna's default); NSGA-II's population
    seed: int = num(0, ge=0, le=2**32 - 1)  # NumPy's seed range
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
    finalize: FinalizeConfig = field(default_factory=FinalizeConfig)

    def check(self) -> None:
        if self.searcher not in SEARCHERS:
            raise ConfigError(f"must be one of {SEARCHERS}, got {self.searcher!r}", "searcher")
        if self.cost not in COSTS:
            raise ConfigError(f"must be one of {COSTS}, got {self.cost!r}", "cost")
        if self.base_model not in PRESETS:
            raise ConfigError(f"must be one of {sorted(PRESETS)}, got {self.base_model!r}", "base_model")
        for key in ("experiment", "storage_dir"):
            if not getattr(self, key):
                raise ConfigError("must not be empty", key)
        problem = contract.uri_credential_problem(self.tracking_uri)
        if problem:
            raise ConfigError(problem, "tracking_uri")
        if not self.registry.register:  # what needs registered versions: measuring, selecting
            needs = [key for key in ("loop.local_agent", "loop.select") if getattr(self.loop, key[5:])]
            needs += [f"cost {self.cost}"] if self.cost.startswith("edge_") else []
            if needs:
                verb = "needs" if len(needs) == 1 else "need"
                raise ConfigError(
                    f"false, but {' and '.join(needs)} {verb} the front's registered versions "
                    "(register them, or turn that off)",
                    "registry.register",
                )
        unbuildable_space(self)

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
            raise ConfigError(f"must be a mapping, got {value!r}", key)
        return build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"must be a list, got {value!r}", key)
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
        raise ConfigError(f"must be {tp.__name__}, got {value!r}", key)
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A ``cls`` dataclass from a mapping; an unknown key or a wrong type names the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        error = ConfigError(f"unknown key(s) {unknown}; known: {sorted(names)}")
        raise error.under(prefix) if prefix else error
    try:
        kwargs = {k: _convert(hints[k], v, k) for k, v in data.items()}
    except ConfigError as exc:
        raise (exc.under(prefix) if prefix else exc) from None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise (exc.under(prefix) if prefix else exc) from None


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


def unbuildable_space(cfg: SearchConfig) -> None:
    """Raise if some point of the space gives no network, before any trial is started.

    The space draws rank in [rank.low, min(rank.high, expand * C)] for each embed_dim C, so the
    smallest rank must fit the smallest C; the other knobs are checked by building the corners.
    """
    base, space = PRESETS[cfg.base_model], cfg.space
    c_low = space.embed_dim.low
    if space.rank.low > base.expand * c_low:
        c_needed = -(-space.rank.low // base.expand)
        raise ConfigError(
            f"low {space.rank.low} exceeds the inner width expand * embed_dim = {base.expand * c_low} of "
            f"embed_dim {c_low} ({cfg.base_model} has expand {base.expand}); lower space.rank.low or raise "
            f"space.embed_dim.low to {c_needed}",
            "space.rank",
        )
    for knob in ("n_groups", "blocks_per_group"):
        r = getattr(space, knob)
        for value in (r.low, r.high) if r else ():
            try:
                preset(cfg.base_model, **{knob: value})
            except ValueError as exc:
                raise ConfigError(str(exc), f"space.{knob}") from None
    teacher = PRESETS[cfg.teacher.preset]
    if cfg.space.alpha.high > 0 and not cfg.teacher.checkpoint and teacher.scale != base.scale:
        raise ConfigError(
            f"{cfg.teacher.preset} is x{teacher.scale} but base_model {cfg.base_model} is x{base.scale}",
            "teacher.preset",
        )


def check_local_paths(cfg: SearchConfig) -> None:
    """Files the driver itself reads, and on a local Ray the data folders, exist before Ray starts.
    (On a cluster the data folders are the workers' paths, which the driver may not see.)"""
    given = cfg.teacher.checkpoint
    local_copy = given[len("dvmsr:") :] if given and given.startswith("dvmsr:") else None
    if local_copy is not None and not Path(local_copy).is_file():
        raise ConfigError(
            f"{local_copy} does not exist (dvmsr:PATH names a local copy)", "teacher.checkpoint"
        )
    if (
        given
        and given != "dvmsr"
        and local_copy is None
        and "://" not in given
        and not given.startswith(("runs:/", "models:/"))
        and not Path(given).is_file()
    ):
        raise ConfigError(
            f"{given} does not exist (a .pt file, a runs:/ or models:/ URI, or dvmsr)", "teacher.checkpoint"
        )
    problem = argtypes.dir_problem(cfg.storage_dir)
    if problem:
        raise ConfigError(problem, "storage_dir")
    if cfg.address is None:
        for key in ("train_data", "val_data"):
            for folder in getattr(cfg.training, key):
                if not Path(folder).is_dir():
                    raise ConfigError(f"{folder} is not a folder on this machine", f"training.{key}")
