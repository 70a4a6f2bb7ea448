"""One small interface for training metrics: console by default, MLflow when asked.

The search adds its own implementation that reports to Ray Tune (search/); nothing here imports
ray. Secrets never go through here: params are the run's configuration, not its environment.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Protocol

from edge_agent import contract

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys, the shape MLflow params want."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class ConsoleTracker:
    """Prints metrics as one line per call; artifacts are only named."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def log_params(self, params: dict[str, Any]) -> None:
        items = ", ".join(f"{k}={v}" for k, v in flatten(params).items())
        print(f"params: {items}", file=self.stream, flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        items = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"step {step}: {items}", file=self.stream, flush=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        print(f"artifact: {path}", file=self.stream, flush=True)

    def close(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker:
    """Logs to an MLflow run (created here, or an existing one by id) through MlflowClient.

    Args:
        tracking_uri: e.g. ``sqlite:///mlflow.db`` or ``http://host:5000``.
        experiment: experiment name, created when missing.
        run_id: log into this run instead of creating one (the search's trial runs).
        tags: tags for a new run (``role``, ``mlflow.parentRunId``, ...).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = contract.EXPERIMENT,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        batch = [m for m in batch if math.isfinite(m.value)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class MultiTracker:
    """Sends every call to several trackers."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log_params(self, params):
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics, step):
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path=None):
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def close(self, status="FINISHED"):
        for t in self.trackers:
            t.close(status)
