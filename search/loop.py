"""The loop that learns from the device: measurements in, a refitted cost model out.

``search/run.py --rounds K --objective edge_energy`` runs K rounds of: search (trials minimise the
cost model's prediction, or FLOPs while there is no model) -> register the new Pareto candidates
-> wait for the edge agent to measure them -> refit. This module holds the pieces that are not
Ray Tune: reading measurements from MLflow, the wait, the local agent process, seeding a round's
Optuna study with the earlier rounds' trials re-scored by the current cost.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent import contract
from search import costmodel, mlflow_util, study
from search.config import SearchConfig
from search.space import model_config


@dataclass(frozen=True)
class Point:
    """One measured candidate: its trial run, architecture features and the measured value."""

    run_id: str
    version: str
    features: dict[str, float]
    measured: float
    predicted: float | None  # what the trial was told when it ran (pred.<device>.<metric>), if any


def measured_points(tracking_uri: str, experiment_id: str, cfg: SearchConfig, metric: str) -> list[Point]:
    """Candidates of this experiment measured on ``cfg.loop.device`` that have ``metric``."""
    return [
        Point(m.trial_run_id, m.version, costmodel.features(model_config(m.knobs, cfg)), m.value, m.predicted)
        for m in study.measurements(
            tracking_uri, experiment_id, cfg.registry.model_name, cfg.loop.device, metric
        )
    ]


def log_round(handle: study.Study, cfg: SearchConfig, k: int) -> dict[str, float]:
    """After round k's measurements: prediction error per trial and per round, and the refit's error.

    On each measured trial run that had a prediction: ``pred_abs_err.<device>.<metric>`` beside
    ``pred.<device>.<metric>`` and ``edge.<device>.<metric>``. On the study run, step k:
    ``costmodel_round_mae`` (error of the predictions the round's trials were steered by, on the
    round's new measurements: a held-out error), ``costmodel_loo_mae`` and ``costmodel_points``.
    """
    c = mlflow_util.client(handle.tracking_uri)
    metric = costmodel.TARGETS[cfg.cost]
    points = measured_points(handle.tracking_uri, handle.experiment_id, cfg, metric)
    errors = []
    for p in points:
        if p.predicted is None:
            continue
        err = abs(p.measured - p.predicted)
        handle.log_run_metrics(p.run_id, {f"pred_abs_err.{cfg.loop.device}.{metric}": err}, step=k)
        if c.get_run(p.run_id).data.tags.get(study.TAG_ROUND) == str(k):
            errors.append(err)
    model = costmodel.fit([(p.features, p.measured) for p in points], metric, cfg.loop.device)
    out = {"costmodel_points": float(len(points))}
    if errors:
        out["costmodel_round_mae"] = sum(errors) / len(errors)
    if model is not None and math.isfinite(model.loo_mae):
        out["costmodel_loo_mae"] = model.loo_mae
    handle.log_metrics(out, step=k)
    return out


ENDED = (contract.DONE, contract.FAILED)  # a version's measurement on a device is over


def statuses(c, model_name: str, versions: list[str], device: str) -> dict[str, str]:
    """version -> its ``edge.<device>.status`` (pending where there is none); no versions, no device
    needed."""
    if not versions:
        return {}
    tag = contract.status_tag(device)
    return {v: c.get_model_version(model_name, v).tags.get(tag, contract.PENDING) for v in versions}


def unmeasured(tracking_uri: str, model_name: str, versions: list[str], device: str) -> list[str]:
    """The versions whose measurement on ``device`` is not over: those a round still waits for,
    whether registered now or by an attempt that was killed before its measurements."""
    status = statuses(mlflow_util.client(tracking_uri), model_name, versions, device)
    return [v for v, s in status.items() if s not in ENDED]


def wait_for_measurements(
    tracking_uri: str,
    model_name: str,
    versions: list[str],
    device: str,
    timeout_s: float,
    agent: LocalAgent | None = None,
    poll_s: float = 2.0,
) -> dict[str, str]:
    """Wait until each version's ``edge.<device>.status`` is done or failed; print what waits.

    Returns version -> status. A timeout is not an error: what is not measured stays pending.
    """
    c = mlflow_util.client(tracking_uri)
    deadline = time.monotonic() + timeout_s
    shown = None
    while True:
        status = statuses(c, model_name, versions, device)
        waiting = [v for v, s in status.items() if s not in ENDED]
        if not waiting:
            return status
        if waiting != shown:
            left = max(0, int(deadline - time.monotonic()))
            print(
                f"waiting for the edge agent to measure {len(waiting)} candidate(s) on '{device}': "
                f"{', '.join('v' + v for v in waiting)} (up to {left} s more)",
                flush=True,
            )
            shown = waiting
        if agent is not None and not agent.alive():
            print(f"the local edge agent exited; its log: {agent.log_path}\n{agent.tail()}", file=sys.stderr)
            return status
        if time.monotonic() > deadline:
            print(
                f"timed out after {timeout_s:.0f} s; not measured yet: "
                f"{', '.join('v' + v for v in waiting)}. "
                f"They stay pending for the agent (`edge-agent run --device {device} ...`).",
                flush=True,
            )
            return status
        time.sleep(poll_s)


def measure(tracking_uri: str, cfg: SearchConfig, versions: list[str], state_dir: Path) -> dict[str, str]:
    """Wait for ``cfg.loop.device``'s measurements of ``versions`` (``wait_for_measurements``).

    With ``loop.local_agent`` the agent measures on the CPU the trials train on, so it runs only
    during this wait: started here, stopped when the wait ends (a version it had not finished is
    handed back and stays pending for the next wait), so that no trial's load is in its windows
    and it takes no core from the trials.
    """
    agent = LocalAgent(tracking_uri, cfg, state_dir) if cfg.loop.local_agent else None
    try:
        return wait_for_measurements(
            tracking_uri, cfg.registry.model_name, versions, cfg.loop.device, cfg.loop.wait_timeout_s, agent
        )
    finally:
        if agent is not None:
            agent.stop()


class LocalAgent:
    """``edge-agent run`` as a child process on this machine (ONNX Runtime on the CPU)."""

    def __init__(self, tracking_uri: str, cfg: SearchConfig, state_dir: Path):
        self.log_path = state_dir / "agent.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "edge_agent", "run", "--tracking-uri", tracking_uri]
        cmd += ["--device", cfg.loop.device, "--model-name", cfg.registry.model_name, "--poll-s", "2"]
        cmd += ["--backend", "onnxruntime", "--state-dir", str(state_dir), *cfg.loop.agent_args]
        # a search that dies, even by kill -9, leaves no agent behind
        cmd += ["--stop-with-parent", str(os.getpid())]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        print(
            f"started the local edge agent (pid {self.proc.pid}, device '{cfg.loop.device}'); "
            f"log: {self.log_path}"
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # hands back an unfinished claim
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


class _Recorder:
    """Replays a trial's params through ``define_space`` to get Optuna's distributions for them."""

    def __init__(self, params: dict[str, Any]):
        import optuna

        self.params, self.distributions, self._d = params, {}, optuna.distributions

    def suggest_int(self, name, low, high, step=1, log=False):
        self.distributions[name] = self._d.IntDistribution(low, high, step=step, log=log)
        return self.params[name]

    def suggest_float(self, name, low, high, step=None, log=False):
        self.distributions[name] = self._d.FloatDistribution(low, high, step=step, log=log)
        return self.params[name]


def seed_study(
    storage_dir: Path, study_name: str, cfg: SearchConfig, scored: list[tuple[dict, float, float]]
) -> int:
    """Create round k's Optuna study holding the earlier rounds' complete trials, re-scored.

    Args:
        scored: (trial params, PSNR, cost under the current cost model or measurement).

    Returns how many trials were added. Ray's OptunaSearch then loads the study (load_if_exists)
    and its sampler starts from what the earlier rounds learned instead of from scratch.
    """
    import optuna

    from search.space import define_space
    from search.study import QUALITY_MODE

    storage = optuna.storages.RDBStorage(f"sqlite:///{(storage_dir / 'optuna.db').resolve()}")
    s = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=["maximize" if QUALITY_MODE == "max" else "minimize", "minimize"],
        load_if_exists=True,
    )
    if s.trials:
        return 0  # a resumed round: already seeded
    added = 0
    for params, psnr, cost in scored:
        if not (math.isfinite(psnr) and math.isfinite(cost)):
            continue
        rec = _Recorder(params)
        define_space(rec, cfg)
        s.add_trial(
            optuna.trial.create_trial(
                params={k: params[k] for k in rec.distributions},
                distributions=rec.distributions,
                values=[psnr, cost],
            )
        )
        added += 1
    return added


@dataclass(frozen=True)
class CostRule:
    """How a round costs its trials for an edge_* cost, fixed once per round: a measured value
    wins, else the cost model's prediction, else FLOPs (no model before two measurements)."""

    measured: dict[str, float]  # trial run id -> what the device measured
    model: Any  # costmodel.CostModel, or None
    n: int  # the measurements it saw


def cost_rule(cfg: SearchConfig, tracking_uri: str, experiment_id: str) -> CostRule | None:
    """The round's rule from the measurements so far (the cost model refitted on all of them); None
    for a cost the search computes (flops_g, params)."""
    if cfg.cost not in costmodel.TARGETS:
        return None
    metric = costmodel.TARGETS[cfg.cost]
    points = measured_points(tracking_uri, experiment_id, cfg, metric)
    model = costmodel.fit([(p.features, p.measured) for p in points], metric, cfg.loop.device)
    return CostRule({p.run_id: p.measured for p in points}, model, len(points))


def costed(rows: list, cfg: SearchConfig, rule: CostRule | None) -> list:
    """The rows with their cost (and its source) under ``rule``; as they are without one."""
    from dataclasses import replace

    from model import count_flops

    if rule is None:
        return list(rows)
    out = []
    for r in rows:
        arch = model_config(r.knobs, cfg)
        if r.run_id in rule.measured:
            cost, source = rule.measured[r.run_id], "measured"
        elif rule.model is not None:
            cost, source = rule.model.predict(arch), "predicted"
        else:
            cost, source = count_flops(arch, 64, 64).gflops, "flops"
        out.append(replace(r, cost=cost, cost_source=source))
    return out


def cost_model_line(k: int, cfg: SearchConfig, model, n: int) -> str:
    if model is None:
        return (
            f"round {k}: {n} measurement(s) of {costmodel.TARGETS[cfg.cost]} on '{cfg.loop.device}' so far, "
            f"too few for a cost model: this round minimises FLOPs instead of {cfg.cost}"
        )
    return (
        f"round {k}: cost model of {model.target} on '{model.device}' fitted on {model.n} "
        f"measurements (leave-one-out MAE {model.loo_mae:.4g})"
    )
