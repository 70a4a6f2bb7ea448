"""The search's command line: flags onto the YAML configuration, and the flags that would be ignored
refused. ``search/run.py`` runs what this returns."""

from __future__ import annotations

import argparse

from edge_agent import argtypes
from search.config import CONFIG_DIR, ConfigError, SearchConfig, check_local_paths, load_config

DESCRIPTION = (
    "The search: Ray Tune + Optuna over embedding dim, rank and alpha, every trial logged to MLflow."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python search/run.py", description=DESCRIPTION)
    p.add_argument("--config", help=f"YAML config (default {CONFIG_DIR / 'default.yaml'})")
    p.add_argument("--smoke-test", action="store_true", help=f"use {CONFIG_DIR / 'smoke.yaml'}")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--num-samples", type=argtypes.positive_int, help="number of trials")
    p.add_argument("--max-concurrent", type=argtypes.positive_int, help="trials running at once")
    p.add_argument("--gpus-per-trial", type=argtypes.nonnegative_float)
    p.add_argument("--cpus-per-trial", type=argtypes.positive_float)
    p.add_argument("--searcher", help="tpe, nsga2, random or gp")
    p.add_argument(
        "--startup-trials",
        type=argtypes.positive_int,
        help="random trials before TPE models / NSGA-II population size",
    )
    p.add_argument("--seed", type=argtypes.nonnegative_int)
    p.add_argument(
        "--train-data", nargs="+", metavar="FOLDER", help="training image folders (training.train_data)"
    )
    p.add_argument(
        "--val-data",
        nargs="+",
        metavar="FOLDER",
        help="validation image folders, the images trials are judged on (training.val_data)",
    )
    p.add_argument(
        "--teacher",
        help="the study's teacher (teacher.checkpoint): dvmsr, dvmsr:PATH for a local copy of DVMSR's "
        "weights, a .pt file or an MLflow URI",
    )
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
    p.add_argument(
        "--local-agent",
        action=argparse.BooleanOptionalAction,
        help="run the edge agent here (loop.local_agent)",
    )
    p.add_argument(
        "--select", action=argparse.BooleanOptionalAction, help="pick the champion at the end (loop.select)"
    )
    p.add_argument(
        "--register",
        action=argparse.BooleanOptionalAction,
        help="export and register the front for the edge agent (registry.register; --no-register: "
        "report the front only)",
    )
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
            ("training.train_data", "train_data"),
            ("training.val_data", "val_data"),
            ("teacher.checkpoint", "teacher"),
            ("storage_dir", "storage_dir"),
            ("cost", "objective"),
            ("loop.rounds", "rounds"),
            ("loop.device", "device"),
            ("loop.wait_timeout_s", "wait_timeout_s"),
            ("loop.local_agent", "local_agent"),
            ("loop.select", "select"),
            ("registry.register", "register"),
        )
        if getattr(args, attr) is not None
    }
    if args.local_agent is False:  # --no-local-agent: the config's arguments for it go with it
        overrides["loop.agent_args"] = []
    if args.config and args.smoke_test:
        raise ConfigError(
            "--smoke-test selects search/configs/smoke.yaml; it cannot be combined with --config"
        )
    path = args.config or (CONFIG_DIR / "smoke.yaml" if args.smoke_test else None)
    cfg = load_config(path, overrides)
    _refuse_ignored_flags(args, cfg)
    check_local_paths(cfg)
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
