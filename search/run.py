"""The search: Ray Tune + Optuna over embedding dim, rank and alpha, every trial logged to MLflow.

    python search/run.py                       # search/configs/default.yaml, local Ray, ./mlflow.db
    python search/run.py --smoke-test          # minutes on a laptop: tiny models, built-in images
    python search/run.py --address auto --tracking-uri http://HEAD:5000   # on a `ray up` cluster
    python search/run.py --resume              # continue the latest study after a crash or Ctrl-C

Steps: train the study's teacher once (or take it from the config), run the trials (each distils a
student and reports every validation; a Pareto-aware rule stops dominated trials early), compute
the Pareto front of validation PSNR against cost from fully trained trials, plot it, export each
candidate to a verified ONNX file and register it in the MLflow Model Registry for the edge agent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_agent import argtypes, contract
from edge_agent.fileio import atomic_write_bytes
from search import compat, study
from search.config import CONFIG_DIR, ConfigError, SearchConfig, load_config

log = logging.getLogger("search")
LATEST = "LATEST"  # file in storage_dir naming the newest study, for --resume


@dataclass
class TrialRow:
    trial_id: str
    run_id: str | None
    status: str  # "complete", "stopped" (early), "failed"
    embed_dim: int
    rank: int
    alpha: float
    step: int
    val_psnr_y: float
    cost: float
    on_front: bool = False
    version: int | None = None
    round: int = 1
    cost_source: str = ""  # for edge_* costs: measured | predicted | flops
    config: dict = field(default_factory=dict)  # the trial's drawn knobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python search/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", help=f"YAML config (default {CONFIG_DIR / 'default.yaml'})")
    p.add_argument("--smoke-test", action="store_true", help=f"use {CONFIG_DIR / 'smoke.yaml'}")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--num-samples", type=argtypes.positive_int, help="number of trials")
    p.add_argument("--max-concurrent", type=argtypes.positive_int, help="trials running at once")
    p.add_argument("--gpus-per-trial", type=argtypes.nonnegative_float)
    p.add_argument("--cpus-per-trial", type=argtypes.positive_float)
    p.add_argument("--searcher", help="tpe, nsga2 or random")
    p.add_argument(
        "--startup-trials",
        type=argtypes.positive_int,
        help="random trials before TPE models / NSGA-II population size",
    )
    p.add_argument("--seed", type=argtypes.nonnegative_int)
    p.add_argument("--storage-dir", help="where Ray's experiment state and the Optuna database live")
    p.add_argument("--resume", action="store_true", help="continue the latest study in --storage-dir")
    p.add_argument(
        "--json",
        type=argtypes.writable_file,
        help="write the summary (trials, front, registered versions) here",
    )
    p.add_argument(
        "--rounds",
        type=argtypes.positive_int,
        help="search -> register -> measure -> refit rounds (loop.rounds)",
    )
    p.add_argument(
        "--objective",
        help="cost beside PSNR: flops_g, params, or edge_energy / edge_latency / edge_power (predicted "
        "from the device's measurements)",
    )
    p.add_argument("--device", help="device type whose measurements steer edge_* costs and selection")
    p.add_argument(
        "--wait-timeout-s", type=argtypes.nonnegative_float, help="per round, for the agent's measurements"
    )
    p.add_argument("--local-agent", action="store_true", default=None, help="run the edge agent here")
    p.add_argument("--select", action="store_true", default=None, help="pick the champion at the end")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    overrides = {
        key: getattr(args, attr)
        for key, attr in (
            ("address", "address"),
            ("tracking_uri", "tracking_uri"),
            ("experiment", "experiment"),
            ("num_samples", "num_samples"),
            ("max_concurrent", "max_concurrent"),
            ("gpus_per_trial", "gpus_per_trial"),
            ("cpus_per_trial", "cpus_per_trial"),
            ("searcher", "searcher"),
            ("startup_trials", "startup_trials"),
            ("seed", "seed"),
            ("storage_dir", "storage_dir"),
            ("cost", "objective"),
            ("loop.rounds", "rounds"),
            ("loop.device", "device"),
            ("loop.wait_timeout_s", "wait_timeout_s"),
            ("loop.local_agent", "local_agent"),
            ("loop.select", "select"),
        )
        if getattr(args, attr) is not None
    }
    if args.config and args.smoke_test:
        raise ConfigError(
            "--smoke-test selects search/configs/smoke.yaml; it cannot be combined with --config"
        )
    path = args.config or (CONFIG_DIR / "smoke.yaml" if args.smoke_test else None)
    cfg = load_config(path, overrides)
    _refuse_ignored_flags(args, cfg)
    _check_local_paths(cfg)
    if args.resume:
        _check_resume(cfg)
    return cfg


def _refuse_ignored_flags(args: argparse.Namespace, cfg: SearchConfig) -> None:
    """A flag the run would not use is an error: the user meant something by it."""
    uses_device = cfg.cost.startswith("edge_") or cfg.loop.local_agent or cfg.loop.select
    for flag, value in (("--device", args.device), ("--wait-timeout-s", args.wait_timeout_s)):
        if value is not None and not uses_device:
            raise ConfigError(
                f"{flag} is only used with an edge_* --objective, --local-agent or --select; "
                "add one or drop it"
            )
    if args.startup_trials is not None and cfg.searcher == "random":
        raise ConfigError("--startup-trials has no effect on the random searcher; drop it or pick tpe/nsga2")


def _check_local_paths(cfg: SearchConfig) -> None:
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


# May differ between a study and its --resume; everything else is the study's and must not change.
RESUMABLE = {
    "address",
    "loop.rounds",
    "loop.wait_timeout_s",
    "loop.local_agent",
    "loop.agent_args",
    "loop.select",
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_latest(storage: Path) -> tuple[str, dict]:
    """(name, state) of the newest study in ``storage``; a missing, empty or damaged file is a
    ConfigError saying which one."""
    latest = storage / LATEST
    if not latest.exists():
        raise ConfigError(f"nothing to resume in {storage}: no study has been started there")
    name = latest.read_text().strip()
    if not name or "/" in name:
        raise ConfigError(f"{latest} does not name a study; start a new one (without --resume)")
    path = _study_state(storage, name)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: study {name} cannot be resumed; start a new one") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(
            f"{path} is damaged (not JSON): study {name} cannot be resumed; start a new one"
        ) from None
    if not isinstance(state, dict) or "study_run_id" not in state:
        raise ConfigError(f"{path} has no study_run_id: study {name} cannot be resumed; start a new one")
    return name, state


def _check_resume(cfg: SearchConfig) -> None:
    name, state = _read_latest(Path(cfg.storage_dir).resolve())
    saved = state.get("config")
    if saved is None:  # a study started before the configuration was kept in study.json
        return
    now, then = _flat(json.loads(json.dumps(cfg.to_dict()))), _flat(saved)
    changed = sorted(k for k in set(now) | set(then) if k not in RESUMABLE and now.get(k) != then.get(k))
    if changed:
        diff = ", ".join(f"{k} ({then.get(k)!r} -> {now.get(k)!r})" for k in changed)
        raise ConfigError(
            f"--resume continues study {name} with the configuration it started with, but these "
            f"differ: {diff}; give the original config and flags, or start a new study without --resume"
        )


class _MlflowStatus:
    """Ray Tune callback: a trial's MLflow run ends with the trial, even when Ray kills its process."""

    def __init__(self, tracking_uri: str, experiment_id: str, study_run_id: str, iterations: int):
        self.args = (tracking_uri, experiment_id, study_run_id)
        self.iterations = iterations

    def _close(self, trial, status: str, tags: dict[str, str]) -> None:
        # Unconditional: a trial's worker may still close its run after Ray stopped it (the
        # worker then leaves an early-stopped run alone, see search/trainable.py).
        uri, exp_id, parent = self.args
        run = study.find_run(uri, exp_id, **{study.PARENT: parent, study.TAG_TRIAL_ID: trial.trial_id})
        if run is None:
            return
        c = study.client(uri)
        for k, v in tags.items():
            c.set_tag(run.info.run_id, k, v)
        c.set_terminated(run.info.run_id, status=status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        stopped = int((trial.last_result or {}).get("step", 0)) < self.iterations
        self._close(trial, "FINISHED", {study.TAG_EARLY_STOPPED: str(stopped).lower()})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", {})


def _tune_callback(*args):
    from ray.tune import Callback

    class MlflowStatusCallback(_MlflowStatus, Callback):
        pass

    return MlflowStatusCallback(*args)


def _interrupted(results, num_samples: int) -> bool:
    """True when Tune returned before every trial ended (it catches SIGINT itself)."""
    statuses = compat.trial_statuses(results)
    return len(statuses) < num_samples or any(s not in ("TERMINATED", "ERROR") for s in statuses)


def _study_state(storage: Path, name: str) -> Path:
    return storage / name / "study.json"


def _write_state(storage: Path, name: str, state: dict) -> None:
    """study.json, replaced atomically: a crash mid-write never leaves half a state for --resume."""
    atomic_write_bytes(_study_state(storage, name), json.dumps(state).encode())


def start_or_resume(
    cfg: SearchConfig, resume: bool, tracking_uri: str, experiment_id: str
) -> tuple[str, dict]:
    """(study name, state) for a new study, or the latest one when resuming."""
    from mlflow.exceptions import MlflowException

    storage = Path(cfg.storage_dir).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    if resume:
        name, state = _read_latest(storage)
        try:
            study.client(tracking_uri).update_run(state["study_run_id"], status="RUNNING")
        except MlflowException as exc:
            raise ConfigError(
                f"study {name}'s run {state['study_run_id']} is not on the tracking server {tracking_uri} "
                f"({exc.message}); resume with the tracking URI the study started with"
            ) from None
        closed = study.close_running_children(tracking_uri, experiment_id, state["study_run_id"], "KILLED")
        if closed:
            log.info("marked %d trial runs of the interrupted study KILLED; their trials rerun", closed)
        return name, state
    name = f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    c = study.client(tracking_uri)
    run = c.create_run(
        experiment_id, run_name=name, tags={contract.ROLE: contract.ROLE_STUDY, study.TAG_STUDY: name}
    )
    from trainers.tracking import MLflowTracker

    MLflowTracker(tracking_uri, run_id=run.info.run_id).log_params(cfg.to_dict())
    state = {"study_run_id": run.info.run_id, "teacher_uri": None, "config": cfg.to_dict()}
    _write_state(storage, name, state)
    atomic_write_bytes(storage / LATEST, name.encode())
    return name, state


def ensure_teacher(cfg: SearchConfig, ctx_base: dict, state: dict, storage: Path, name: str) -> str | None:
    """The runs:/ URI of the study's teacher: given (a file, an MLflow URI, or ``dvmsr``),
    already trained, or trained now (once)."""
    import torch

    from model import dvmsr

    if cfg.space.alpha.high == 0:
        return None  # no distillation in this space
    if state.get("teacher_uri"):
        return state["teacher_uri"]
    uri, run_id = ctx_base["tracking_uri"], state["study_run_id"]
    given = cfg.teacher.checkpoint
    if given and dvmsr.is_spec(given):  # DVMSR's published weights, logged once for every trial
        path = dvmsr.resolve(given)
        study.client(uri).log_artifact(run_id, str(path), "teacher")
        teacher_uri = f"runs:/{run_id}/teacher/{path.name}"
        source = torch.load(path, map_location="cpu", weights_only=True).get("source", {})
        for key in ("file", "sha256", "repository"):
            if key in source:
                study.client(uri).set_tag(run_id, f"{study.TAG_TEACHER}.{key}", str(source[key]))
    elif given and (given.startswith(("runs:/", "models:/", "mlflow-artifacts:")) or "://" in given):
        teacher_uri = given
    elif given:
        if not Path(given).is_file():
            raise ConfigError(f"teacher.checkpoint {given} does not exist")
        study.client(uri).log_artifact(run_id, given, "teacher")
        teacher_uri = f"runs:/{run_id}/teacher/{Path(given).name}"
    else:
        import ray

        from search.trainable import StudyContext, train_teacher

        log.info("training the study's teacher (%s, %d steps)", cfg.teacher.preset, cfg.teacher.iterations)
        ctx = StudyContext(**ctx_base, study_run_id=run_id, teacher_uri=None)
        task = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)(train_teacher)
        teacher_uri = ray.get(task.remote(ctx, str(storage / name / "teacher")))
    state["teacher_uri"] = teacher_uri
    study.client(uri).set_tag(run_id, study.TAG_TEACHER_URI, teacher_uri)
    from mlflow.exceptions import MlflowException

    try:
        checkpoint = study.single_file(study.download(teacher_uri, uri), ".pt")
    except (MlflowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        raise ConfigError(
            f"{teacher_uri} cannot be fetched from {uri} ({first})", "teacher.checkpoint"
        ) from None
    psnr = teacher_val_psnr(cfg, checkpoint)
    study.client(uri).log_metric(run_id, "teacher_val_psnr_y", psnr)
    print(f"teacher {teacher_uri}: validation PSNR-Y {psnr:.2f} dB (the students' validation images)")
    _write_state(storage, name, state)
    return teacher_uri


def teacher_val_psnr(cfg: SearchConfig, checkpoint: Path) -> float:
    """The teacher's PSNR-Y on the trials' validation images, so its strength is on record."""
    import torch

    from model.mambalitesr import load_model
    from trainers.data import load_sets
    from trainers.train import validate

    net = load_model(str(checkpoint))
    pairs = load_sets(list(cfg.training.val_data), "val", net.cfg.scale)
    if cfg.training.val_max_images:
        pairs = pairs[: cfg.training.val_max_images]
    return validate(net, pairs, torch.device("cpu"))["val_psnr_y"]


def collect(
    results, cfg: SearchConfig, tracking_uri: str, experiment_id: str, study_run_id: str, k: int = 1
) -> list[TrialRow]:
    from search.searcher import fully_trained

    rows = []
    for r in results:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or (r.path and Path(r.path).name)
        run = study.find_run(
            tracking_uri, experiment_id, **{study.PARENT: study_run_id, study.TAG_TRIAL_ID: trial_id}
        )
        status = "failed" if r.error else ("complete" if fully_trained(m) else "stopped")
        if run is not None:
            _settle_run(tracking_uri, run, "FAILED" if r.error else "FINISHED", status == "stopped")
        rows.append(
            TrialRow(
                trial_id=trial_id,
                run_id=run.info.run_id if run else None,
                status=status,
                embed_dim=int(r.config.get("embed_dim", 0)),
                rank=int(r.config.get("rank", 0)),
                alpha=float(r.config.get("alpha", 0.0)),
                step=int(m.get("step", 0)),
                val_psnr_y=float(m.get("val_psnr_y", math.nan)),
                cost=float(m.get(cfg.cost, math.nan)),
                round=k,
                config={key: r.config[key] for key in r.config},
            )
        )
    return rows


def _settle_run(tracking_uri: str, run, status: str, stopped: bool) -> None:
    """The trial run ends as Tune saw the trial end. The callback and the worker close runs as they
    go, but a driver killed between Tune's checkpoint and the callback (then --resume) or a worker
    writing late can leave another status; Tune's result is the one that counts."""
    c = study.client(tracking_uri)
    early = str(stopped).lower()
    if run.data.tags.get(study.TAG_EARLY_STOPPED) != early:
        c.set_tag(run.info.run_id, study.TAG_EARLY_STOPPED, early)
    if run.info.status != status:
        log.warning(
            "trial run %s was %s after the search; set to %s", run.info.run_id, run.info.status, status
        )
        c.set_terminated(run.info.run_id, status=status)


def format_table(rows: list[TrialRow], cost: str) -> str:
    head = f"{'trial':12s} {'status':9s} {'C':>3s} {'r':>3s} {'alpha':>5s} {'step':>5s}"
    lines = [f"{head} {'PSNR-Y':>7s} {cost:>8s}  front"]
    for r in sorted(rows, key=lambda r: (r.status != "complete", r.cost)):
        mark = f"v{r.version}" if r.version else ("*" if r.on_front else "")
        lines.append(
            f"{r.trial_id[:12]:12s} {r.status:9s} {r.embed_dim:3d} {r.rank:3d} {r.alpha:5.2f} {r.step:5d} "
            f"{r.val_psnr_y:7.2f} {r.cost:8.4f}  {mark}"
        )
    return "\n".join(lines)


def finish(
    rows: list[TrialRow],
    cfg: SearchConfig,
    tracking_uri: str,
    study_run_id: str,
    out_dir: Path,
    finalize=None,
) -> dict:
    """Pareto front of fully trained trials, plots and table on the study run, registration.

    ``finalize(row)``, when given, retrains a front candidate and returns the run holding its
    final weights, which are then the ones registered (``finalize.iterations``).
    """
    from search.pareto import hypervolume_2d, pareto_front, plot_front
    from search.registry import register_candidate, version_of_trial

    complete = [r for r in rows if r.status == "complete" and math.isfinite(r.val_psnr_y)]
    for i in pareto_front([(r.val_psnr_y, r.cost) for r in complete], ("max", "min")):
        complete[i].on_front = True
    front = [r for r in complete if r.on_front]
    c = study.client(tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    if complete:
        plot_rows = [
            {
                "quality": r.val_psnr_y,
                "cost": r.cost,
                "on_front": r.on_front,
                "label": f"C{r.embed_dim} r{r.rank} a{r.alpha:.2f}",
            }
            for r in complete
        ]
        png, html = out_dir / "pareto.png", out_dir / "pareto.html"
        plot_front(
            plot_rows, "val_psnr_y (dB)", cfg.cost, png, html, title=f"{cfg.experiment}: fully trained trials"
        )
        c.log_artifact(study_run_id, str(png), "pareto")
        c.log_artifact(study_run_id, str(html), "pareto")
    for r in front:
        if r.run_id is None:
            continue
        registered = version_of_trial(tracking_uri, cfg.registry.model_name, r.run_id)
        weights = finalize(r) if finalize is not None and registered is None else None
        reg = register_candidate(
            tracking_uri,
            r.run_id,
            cfg.registry.model_name,
            cfg.registry.devices,
            cfg.registry.input_size,
            weights_run_id=weights,
        )
        r.version = int(reg.version)
    table = format_table(rows, cfg.cost)
    (out_dir / "trials.txt").write_text(table + "\n")
    (out_dir / "trials.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    c.log_artifact(study_run_id, str(out_dir / "trials.txt"), "pareto")
    c.log_artifact(study_run_id, str(out_dir / "trials.json"), "pareto")
    worst_q = min((r.val_psnr_y for r in complete), default=0.0)
    worst_c = max((r.cost for r in complete), default=1.0)
    reference = (worst_q - 0.1, worst_c * 1.1)
    summary = {
        "trials": len(rows),
        "complete": len(complete),
        "stopped_early": sum(r.status == "stopped" for r in rows),
        "failed": sum(r.status == "failed" for r in rows),
        "front_size": len(front),
        "hypervolume": hypervolume_2d([(r.val_psnr_y, r.cost) for r in complete], reference),
    }
    for k, v in summary.items():
        c.log_metric(study_run_id, f"search_{k}", float(v))
    print(table)
    return summary


def rescore(
    rows: list[TrialRow], cfg: SearchConfig, tracking_uri: str, experiment_id: str
) -> tuple[object | None, int]:
    """For an edge_* cost, every row's cost as of now: measured > predicted > FLOPs.

    Measured values always win; the others are predicted by the cost model refitted on all the
    measurements so far; with fewer than two measurements there is no model and FLOPs stand in.
    Returns (the cost model or None, how many measurements it saw).
    """
    from model import count_flops
    from search import costmodel, loop
    from search.space import model_config

    if cfg.cost not in costmodel.TARGETS:
        return None, 0
    metric = costmodel.TARGETS[cfg.cost]
    points = loop.measured_points(tracking_uri, experiment_id, cfg, metric)
    model = costmodel.fit([(p.features, p.measured) for p in points], metric, cfg.loop.device)
    measured = {p.run_id: p.measured for p in points}
    for r in rows:
        arch = model_config(r.config, cfg)
        if r.run_id in measured:
            r.cost, r.cost_source = measured[r.run_id], "measured"
        elif model is not None:
            r.cost, r.cost_source = model.predict(arch), "predicted"
        else:
            r.cost, r.cost_source = count_flops(arch, 64, 64).gflops, "flops"
    return model, len(points)


def run_round(
    k: int, cfg: SearchConfig, args, ctx, storage: Path, name: str, ray_storage: str, earlier: list[TrialRow]
):
    """One Ray Tune run of ``cfg.num_samples`` trials; round k > 1 starts from the earlier trials."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search import loop
    from search.scheduler import ParetoRungScheduler
    from search.searcher import QUALITY, make_searcher
    from search.trainable import run_trial

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx), {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    )
    callbacks = [
        _tune_callback(ctx.tracking_uri, ctx.experiment_id, ctx.study_run_id, cfg.training.iterations)
    ]
    ray_name = "ray" if k == 1 else f"ray-r{k}"
    study_name = name if k == 1 else f"{name}-r{k}"
    path = f"{ray_storage}/{ray_name}"
    if args.resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        ).fit()
    if earlier:
        scored = [(r.config, r.val_psnr_y, r.cost) for r in earlier if r.status == "complete"]
        added = loop.seed_study(storage, study_name, cfg, scored)
        print(f"round {k}: the searcher starts from {added} earlier trials, re-scored with the current cost")
    scheduler = None
    if cfg.early_stopping.enabled:
        scheduler = ParetoRungScheduler(
            QUALITY, cfg.cost, "step", cfg.early_stopping.min_rung, cfg.early_stopping.margin_db
        )
    searcher = ConcurrencyLimiter(make_searcher(cfg, study_name, storage), max_concurrent=cfg.max_concurrent)
    reporter = tune.CLIReporter(
        metric_columns=["step", QUALITY, cfg.cost], parameter_columns=["embed_dim", "rank", "alpha"]
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=cfg.num_samples,
            reuse_actors=True,  # 3.7 s -> 0.25 s of overhead per trial (docs/benchmarks.md)
        ),
        run_config=tune.RunConfig(
            name=ray_name,
            storage_path=ray_storage,
            callbacks=callbacks,
            progress_reporter=reporter,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    return tuner.fit()


def main(argv: list[str] | None = None) -> int:
    # save Ray's experiment state at every step, so a crash loses as little as possible (here, not
    # under __main__, so that the mambalitesr-search entry point gets it too)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    import ray

    from edge_agent import preflight
    from model.runtime import keep_freed_memory
    from search import loop, resources
    from search.costmodel import TARGETS
    from search.trainable import StudyContext

    keep_freed_memory()
    tracking_uri = study.absolute_tracking_uri(cfg.tracking_uri)
    preflight.limit_mlflow_retries()  # before ray.init: a local Ray's workers inherit it
    problem = preflight.tracking_server_problem(tracking_uri)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    # Ray first: a request no node can hold fails before a study run or LATEST is written
    ray.init(address=cfg.address, include_dashboard=False)
    local = cfg.address in (None, "local")  # a Ray this process starts cannot grow
    problem = resources.trial_fit_problem(cfg.cpus_per_trial, cfg.gpus_per_trial, local=local)
    if problem:  # Ray would queue the teacher and every trial forever
        print(f"error: {problem}", file=sys.stderr)
        ray.shutdown()
        return 1
    try:
        experiment_id = study.ensure_experiment(tracking_uri, cfg.experiment)
        name, state = start_or_resume(cfg, args.resume, tracking_uri, experiment_id)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        ray.shutdown()
        return 2
    storage = Path(cfg.storage_dir).resolve()
    study_run_id = state["study_run_id"]
    print(f"study {name}: MLflow run {study_run_id} in experiment '{cfg.experiment}' at {tracking_uri}")
    edge_cost = cfg.cost in TARGETS
    wait = edge_cost or cfg.loop.local_agent or cfg.loop.select

    status, agent, timings = "FAILED", None, {}
    try:
        ctx_base = {"config": cfg.to_dict(), "tracking_uri": tracking_uri, "experiment_id": experiment_id}
        t0 = time.monotonic()
        teacher_uri = ensure_teacher(cfg, ctx_base, state, storage, name)
        timings["teacher_s"] = time.monotonic() - t0
        ray_storage = f"{cfg.ray_storage.rstrip('/')}/{name}" if cfg.ray_storage else str(storage / name)
        rows: list[TrialRow] = [TrialRow(**r) for r in state.get("rows", [])]
        summary = state.get("summary", {})
        for k in range(state.get("rounds_done", 0) + 1, cfg.loop.rounds + 1):
            model, n = rescore(rows, cfg, tracking_uri, experiment_id)
            if edge_cost and model is None:
                print(
                    f"round {k}: {n} measurement(s) of {TARGETS[cfg.cost]} on '{cfg.loop.device}' so far, "
                    f"too few for a cost model: this round minimises FLOPs instead of {cfg.cost}"
                )
            elif edge_cost:
                print(
                    f"round {k}: cost model of {model.target} on '{model.device}' fitted on {model.n} "
                    f"measurements (leave-one-out MAE {model.loo_mae:.4g})"
                )
            ctx = StudyContext(
                **ctx_base,
                study_run_id=study_run_id,
                teacher_uri=teacher_uri,
                round=k,
                cost_model=model.to_dict() if model is not None else None,
            )
            t0 = time.monotonic()
            results = run_round(k, cfg, args, ctx, storage, name, ray_storage, rows)
            if _interrupted(results, cfg.num_samples):  # Ctrl-C: Tune saved its state and returned
                raise KeyboardInterrupt
            timings[f"round{k}_search_s"] = time.monotonic() - t0
            new_rows = collect(results, cfg, tracking_uri, experiment_id, study_run_id, k)
            rows += new_rows
            if all(r.status == "failed" for r in new_rows):
                raise StudyFailed(_all_failed_message(results, k, ray_storage))
            rescore(rows, cfg, tracking_uri, experiment_id)
            registered = {r.version for r in rows if r.version}
            t0 = time.monotonic()
            finalize = _finalizer(cfg, ctx, storage / name / "finalize") if cfg.finalize.iterations else None
            summary = finish(rows, cfg, tracking_uri, study_run_id, storage / name / "report", finalize)
            timings[f"round{k}_register_s"] = time.monotonic() - t0
            new = [str(r.version) for r in rows if r.version and r.version not in registered]
            if wait and new:
                if cfg.loop.local_agent and agent is None:
                    agent = loop.LocalAgent(tracking_uri, cfg, storage / name / "agent")
                t0 = time.monotonic()
                loop.wait_for_measurements(
                    tracking_uri,
                    cfg.registry.model_name,
                    new,
                    cfg.loop.device,
                    cfg.loop.wait_timeout_s,
                    agent,
                )
                timings[f"round{k}_measure_s"] = time.monotonic() - t0
            if edge_cost:
                errors = loop.log_round(tracking_uri, experiment_id, study_run_id, cfg, k)
                print(f"round {k}: cost model after this round's measurements: {json.dumps(errors)}")
            state["rows"] = [asdict(r) for r in rows]
            state["rounds_done"], state["summary"] = k, summary
            _write_state(storage, name, state)
        rescore(rows, cfg, tracking_uri, experiment_id)  # the last round's measurements, for the JSON
        print(json.dumps(summary))
        champion = None
        if cfg.loop.select:
            t0 = time.monotonic()
            champion = _select(cfg, tracking_uri, study_run_id)
            timings["select_s"] = time.monotonic() - t0
        for key, value in timings.items():
            study.client(tracking_uri).log_metric(study_run_id, f"wall_{key}", value)
        print("stage wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        if cfg.tracking_uri.startswith("sqlite:///"):
            print(f"see everything in the MLflow UI: mlflow ui --backend-store-uri {cfg.tracking_uri}")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "study": name,
                        "study_run_id": study_run_id,
                        "summary": summary,
                        "champion": champion,
                        "timings_s": timings,
                        "trials": [asdict(r) for r in rows],
                    },
                    indent=2,
                )
            )
        status = "FINISHED"
        return 0
    except StudyFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found once Ray is up: the teacher cannot be fetched
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        status = "KILLED"
        print(
            f"interrupted: continue with `python search/run.py --resume --storage-dir {cfg.storage_dir}`",
            file=sys.stderr,
        )
        return 130
    finally:
        if agent is not None:
            agent.stop()
        study.close_running_children(tracking_uri, experiment_id, study_run_id, "KILLED")
        study.client(tracking_uri).set_terminated(study_run_id, status=status)
        ray.shutdown()


def _finalizer(cfg: SearchConfig, ctx, root: Path):
    """finalize(row): the row's knobs retrained for finalize.iterations steps as a Ray task (with a
    trial's resources), into ``root/<trial id>`` so that --resume continues it; returns its run id."""
    import ray

    from search.trainable import FINAL_QUALITY, finalize_candidate

    task = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)(finalize_candidate)

    def finalize(row: TrialRow) -> str:
        print(f"finalizing {row.trial_id} (C{row.embed_dim} r{row.rank}): {cfg.finalize.iterations} steps")
        run_id = ray.get(task.remote(ctx, row.config, row.run_id, str(root / row.trial_id)))
        final = study.client(ctx.tracking_uri).get_run(row.run_id).data.metrics.get(FINAL_QUALITY)
        print(
            f"finalized {row.trial_id}: {FINAL_QUALITY} {final:.2f} dB "
            f"(the trial reached {row.val_psnr_y:.2f})"
        )
        return run_id

    return finalize


class StudyFailed(RuntimeError):
    """Every trial of a round failed: there is nothing to register, and the exit code says so."""


def _all_failed_message(results, k: int, ray_storage: str) -> str:
    errors = [r.error for r in results if r.error]
    cause = getattr(errors[0], "cause", None) or errors[0] if errors else None  # Ray wraps the trial's
    first = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}" if cause else "none recorded"
    return (
        f"all {len(errors)} trials of round {k} failed, so nothing was registered; the first error: "
        f"{first[:300]} (full tracebacks: error.txt in the trial folders under {ray_storage})"
    )


def _select(cfg: SearchConfig, tracking_uri: str, study_run_id: str) -> dict | None:
    """Selection at the end of the loop; a study with nothing measurable is reported, not fatal."""
    from search.selection import SelectionError, select_champion, table

    try:
        sel = select_champion(
            tracking_uri,
            cfg.experiment,
            device=cfg.loop.device,
            rule=cfg.loop.select_rule,
            model_name=cfg.registry.model_name,
            study_run_id=study_run_id,
        )
    except SelectionError as exc:
        print(f"selection: {exc}")
        return None
    print(table(sel.rows))
    print(sel.message)
    return sel.to_dict()


if __name__ == "__main__":
    sys.exit(main())
