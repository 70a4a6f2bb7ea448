"""What runs on Ray workers: the shared teacher task and one trial (a distilled student).

Both log to MLflow themselves, so they work from any node that reaches the tracking URI.
Results go to Tune through ``search.compat.report``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from typing import Any

import torch

from edge_agent import contract
from search import compat, study
from search.config import SearchConfig, build
from search.space import model_config
from trainers.tracking import MLflowTracker
from trainers.train import TrainConfig, train

QUALITY = "val_psnr_y"
FINAL_QUALITY = "final_val_psnr_y"  # on a trial run: the PSNR of its finalized (retrained) weights
KNOBS = ("embed_dim", "rank", "alpha", "n_groups", "blocks_per_group")  # logged as params of a trial
NODE_LOCAL = ("teacher", "out_dir", "device")  # TrainConfig fields not logged as trial params


@dataclass(frozen=True)
class StudyContext:
    """What every trial needs to know about its study; passed with ``tune.with_parameters``."""

    config: dict[str, Any]  # SearchConfig.to_dict()
    tracking_uri: str  # absolute
    experiment_id: str
    study_run_id: str
    teacher_uri: str | None  # runs:/... of the teacher checkpoint
    round: int = 1  # the learning loop's round (search/run.py --rounds)
    cost_model: dict[str, Any] | None = None  # search.costmodel.CostModel.to_dict(), for edge_* costs

    @property
    def search(self) -> SearchConfig:
        return build(SearchConfig, self.config)


class TuneTracker:
    """Sends each validation to Ray Tune (a rung for the scheduler), everything to MLflow."""

    def __init__(self, mlflow_tracker: MLflowTracker, constants: dict[str, float]):
        self.mlflow, self.constants, self.last_step = mlflow_tracker, constants, -1

    def log_params(self, params):
        # paths differ between nodes, and a restarted trial may land on another node
        params = {k: v for k, v in params.items() if k not in NODE_LOCAL}
        scan_form = params.pop("scan_form", None)
        self.mlflow.log_params(params)
        if scan_form is not None:
            # the form that ran depends on the node too (a compiler, a GPU): a trial restarted on a
            # node of another kind keeps its first value (MLflow refuses a changed param) plus a tag
            first = self.mlflow.client.get_run(self.mlflow.run_id).data.params.get("scan_form")
            if first is None:
                self.mlflow.log_params({"scan_form": scan_form})
            elif first != scan_form:
                self.mlflow.client.set_tag(self.mlflow.run_id, "scan_form.after_restart", scan_form)

    def log_metrics(self, metrics, step):
        self.mlflow.log_metrics(metrics, step)
        if QUALITY in metrics and step != self.last_step:
            self.last_step = step
            compat.report({**self.constants, **metrics, "step": step})

    def log_artifact(self, path, artifact_path=None):
        self.mlflow.log_artifact(path, artifact_path)

    def close(self, status="FINISHED"):
        self.mlflow.close(status)


def _threads(cpus: float) -> None:
    torch.set_num_threads(max(1, math.floor(cpus)))


def train_teacher(ctx: StudyContext, out_dir: str) -> str:
    """Train the study's teacher once and return the runs:/ URI of its checkpoint."""
    cfg = ctx.search
    _threads(cfg.cpus_per_trial)
    from model.mambalitesr import preset

    t = cfg.teacher
    train_cfg = TrainConfig(
        role="teacher",
        model=preset(t.preset),
        iterations=t.iterations,
        batch_size=t.batch_size,
        patch_size=t.patch_size,
        val_every=max(1, t.iterations // 4),
        lr=cfg.training.lr,
        train_data=cfg.training.train_data,
        val_data=cfg.training.val_data,
        val_max_images=cfg.training.val_max_images,
        out_dir=out_dir,
        seed=cfg.seed,
    )
    tags = {contract.ROLE: contract.ROLE_TEACHER, study.PARENT: ctx.study_run_id}
    tracker = MLflowTracker(ctx.tracking_uri, cfg.experiment, run_name="teacher", tags=tags)
    status = "FAILED"
    try:
        train(train_cfg, tracker)
        status = "FINISHED"
    finally:
        tracker.close(status)
    return f"runs:/{tracker.run_id}/checkpoint/last.pt"


def student_config(ctx: StudyContext, params: dict[str, Any], iterations: int, val_every: int) -> TrainConfig:
    """The training of a student with a trial's knobs (the trial's, or its finalization's)."""
    cfg = ctx.search
    alpha = float(params.get("alpha", 0.0))
    teacher = None
    if alpha > 0:
        if not ctx.teacher_uri:
            raise RuntimeError("alpha > 0 but the study has no teacher")
        teacher = str(study.single_file(study.download(ctx.teacher_uri, ctx.tracking_uri), ".pt"))
    return TrainConfig(
        role="student",
        model=model_config(params, cfg),
        teacher=teacher,
        alpha=alpha,
        lr=float(params.get("lr", cfg.training.lr)),
        iterations=iterations,
        val_every=val_every,
        batch_size=cfg.training.batch_size,
        patch_size=cfg.training.patch_size,
        train_data=cfg.training.train_data,
        val_data=cfg.training.val_data,
        val_max_images=cfg.training.val_max_images,
        seed=cfg.seed,
    )


def finalize_candidate(ctx: StudyContext, params: dict[str, Any], trial_run_id: str, out_dir: str) -> str:
    """Retrain a front candidate with its own knobs for ``finalize.iterations`` steps; returns the
    id of the finalization's run (a child of the study, tagged with its trial's run).

    Resumable: ``out_dir`` persists on the driver's node, so a study resumed after a crash continues
    from the last checkpoint there instead of starting over.
    """
    from pathlib import Path

    cfg = ctx.search
    _threads(cfg.cpus_per_trial)
    n = cfg.finalize.iterations
    train_cfg = replace(student_config(ctx, params, n, min(cfg.training.val_every, n)), out_dir=out_dir)
    tags = {
        contract.ROLE: study.ROLE_FINALIZE,
        study.PARENT: ctx.study_run_id,
        study.TAG_FINALIZED_FROM: trial_run_id,
    }
    tracker = MLflowTracker(ctx.tracking_uri, cfg.experiment, run_name="finalize", tags=tags)
    status = "FAILED"
    try:
        # the knobs as a trial logs them: selection and the cost model read them from the version's run
        trial_params = study.client(ctx.tracking_uri).get_run(trial_run_id).data.params
        tracker.log_params({k: trial_params[k] for k in KNOBS if k in trial_params})
        result = train(train_cfg, tracker, resume=(Path(out_dir) / "last.pt").exists())
        status = "FINISHED"
    finally:
        tracker.close(status)
    study.client(ctx.tracking_uri).log_metric(trial_run_id, FINAL_QUALITY, result.val_psnr_y)
    return tracker.run_id


def _report_if_already_trained(ctx: StudyContext, trial_id: str, constants: dict[str, float]) -> bool:
    """A trial that finished or was stopped early before the driver died, rerun by Ray after
    --resume, is not trained again: its recorded result is reported instead (Ray's experiment state
    can lag behind MLflow)."""
    run = study.find_run(
        ctx.tracking_uri, ctx.experiment_id, **{study.PARENT: ctx.study_run_id, study.TAG_TRIAL_ID: trial_id}
    )
    if run is None or run.info.status != "FINISHED" or QUALITY not in run.data.metrics:
        return False
    history = study.client(ctx.tracking_uri).get_metric_history(run.info.run_id, QUALITY)
    last = max(history, key=lambda m: m.step)
    if last.step < constants["iterations"] and run.data.tags.get(study.TAG_EARLY_STOPPED) != "true":
        return False
    compat.report({**constants, **run.data.metrics, QUALITY: last.value, "step": last.step})
    return True


def edge_cost(
    cfg: SearchConfig, ctx: StudyContext, model, constants: dict[str, float]
) -> tuple[str, float, str] | None:
    """For an edge_* cost: the cost model's prediction (or FLOPs before there is a model).

    Sets ``constants[cfg.cost]`` (what the trial reports to Tune) and returns (the prediction's
    metric name for the trial run, its value, its source), or None for a computed cost.
    """
    from search.costmodel import TARGETS, CostModel

    if cfg.cost not in TARGETS:
        return None
    key = study.prediction_key(cfg.loop.device, TARGETS[cfg.cost])
    if ctx.cost_model is None:
        constants[cfg.cost] = constants["flops_g"]
        return key, constants["flops_g"], "flops_fallback"
    value = CostModel.from_dict(ctx.cost_model).predict(model)
    constants[cfg.cost] = value
    return key, value, "costmodel"


def run_trial(params: dict[str, Any], ctx: StudyContext) -> None:
    """One trial: distil a student with the drawn knobs; report each validation to Tune."""
    from model import build_model, count_flops, count_params

    cfg = ctx.search
    _threads(cfg.cpus_per_trial)
    trial_id, trial_name = compat.trial_identity()
    model = model_config(params, cfg)
    alpha = float(params.get("alpha", 0.0))
    constants = {
        "flops_g": count_flops(model, 64, 64).gflops,
        "params": float(count_params(build_model(model))),
        "iterations": float(cfg.training.iterations),
    }
    prediction = edge_cost(cfg, ctx, model, constants)
    if _report_if_already_trained(ctx, trial_id, constants):
        return
    run_id = study.trial_run_id(ctx.tracking_uri, ctx.experiment_id, ctx.study_run_id, trial_id, trial_name)
    mlflow_tracker = MLflowTracker(ctx.tracking_uri, run_id=run_id)
    tracker = TuneTracker(mlflow_tracker, constants)
    status = "FAILED"
    import ray

    study.client(ctx.tracking_uri).set_tag(run_id, study.TAG_NODE_ID, ray.get_runtime_context().get_node_id())
    try:  # from here on, whatever fails is recorded on the trial's run
        mlflow_tracker.log_metrics({"flops_g": constants["flops_g"], "params": constants["params"]}, 0)
        c = study.client(ctx.tracking_uri)
        c.set_tag(run_id, study.TAG_ROUND, str(ctx.round))
        if prediction:
            key, value, source = prediction
            c.set_tag(run_id, study.TAG_COST_SOURCE, source)
            if source == "costmodel":
                mlflow_tracker.log_metrics({key: value}, ctx.round)
        tracker.log_params(
            {
                "embed_dim": model.embed_dim,
                "rank": model.rank,
                "alpha": alpha,
                "n_groups": model.n_groups,
                "blocks_per_group": model.blocks_per_group,
            }
        )
        train_cfg = student_config(ctx, params, cfg.training.iterations, cfg.training.val_every)
        # Not in Ray's trial folder: for the first trial of each worker that folder is in the
        # driver's staging area, which Ray's experiment syncer copies to storage in the background,
        # catching (and keeping) checkpoints half-written. What the trial keeps goes to MLflow.
        with tempfile.TemporaryDirectory(prefix=f"trial-{trial_id}-", ignore_cleanup_errors=True) as out:
            train(replace(train_cfg, out_dir=out), tracker)
        status = "FINISHED"
    except Exception as exc:
        study.client(ctx.tracking_uri).set_tag(run_id, "search.error", f"{type(exc).__name__}: {exc}"[:500])
        raise
    except BaseException:
        # Ray stopping the trial (an early stop ends this thread with SystemExit) or the process
        # going down: the driver closes the run (search/run.py), so the worker leaves it alone
        # instead of racing the driver's verdict.
        status = None
        raise
    finally:
        if status is not None:
            mlflow_tracker.close(status)
