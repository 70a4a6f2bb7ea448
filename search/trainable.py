"""What runs on Ray workers: the shared teacher task and one trial (a distilled student).

Both log to MLflow themselves, so they work from any node that reaches the tracking URI.
Results go to Tune through ``search.compat.report``.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from edge_agent import contract
from model.inherit import in_teacher_topology
from model.mambalitesr import ModelConfig, load_model
from search import compat, mlflow_util, study
from search.config import SearchConfig, build, knob_names
from search.space import model_config
from search.study import FINAL_QUALITY, QUALITY, Study
from trainers.tracking import MLflowTracker
from trainers.train import TrainConfig, train

NODE_LOCAL = ("teacher", "out_dir", "device", "init_weights")  # TrainConfig fields that differ between nodes


@dataclass(frozen=True)
class StudyContext:
    """What every trial needs to know about its study; passed with ``tune.with_parameters``."""

    config: dict[str, Any]  # SearchConfig.to_dict()
    study: Study  # the study's MLflow state
    teacher_uri: str | None  # runs:/... of the teacher checkpoint
    round: int = 1  # the learning loop's round (search/run.py --rounds)
    cost_model: dict[str, Any] | None = None  # search.costmodel.CostModel.to_dict(), for edge_* costs
    init: str = "scratch"  # where the students' weights start (search.stages.student_init)

    @property
    def search(self) -> SearchConfig:
        return build(SearchConfig, self.config)

    @property
    def tracking_uri(self) -> str:
        return self.study.tracking_uri


class SearchRunTracker(MLflowTracker):
    """MLflow logging for the search's own runs (trials, the teacher, finalizations).

    The training's whole configuration goes to one JSON artifact instead of dozens of params, each
    of which would be a column of the experiment's runs table; as params only ``keep`` (e.g. a
    finalization's ``iterations``) and the scan form that ran. A trial's knobs came with its run.
    """

    def __init__(self, *args, keep: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.keep = keep

    def log_params(self, params):
        kept = {k: v for k, v in params.items() if k not in NODE_LOCAL}  # paths of one node
        self.client.log_dict(
            self.run_id, json.loads(json.dumps(kept, default=str)), study.TRIAL_CONFIG_ARTIFACT
        )
        super().log_params({k: params[k] for k in self.keep if k in params})
        scan_form = params.get("scan_form")
        if scan_form is None:
            return
        # the form that ran depends on the node (a compiler, a GPU): a trial restarted on a node of
        # another kind keeps its first value (MLflow refuses a changed param) plus a tag
        first = self.client.get_run(self.run_id).data.params.get("scan_form")
        if first is None:
            super().log_params({"scan_form": scan_form})
        elif first != scan_form:
            self.client.set_tag(self.run_id, "scan_form.after_restart", scan_form)


class TuneTracker:
    """Sends each validation to Ray Tune (a rung for the scheduler), everything to MLflow."""

    def __init__(self, mlflow_tracker: SearchRunTracker, constants: dict[str, float]):
        self.mlflow, self.constants, self.last_step = mlflow_tracker, constants, -1

    def log_params(self, params):
        self.mlflow.log_params(params)

    def log_metrics(self, metrics, step):
        self.mlflow.log_metrics(metrics, step)
        if QUALITY in metrics and step != self.last_step:
            self.last_step = step
            compat.report({**self.constants, **metrics, "step": step})

    def log_artifact(self, path, artifact_path=None):
        self.mlflow.log_artifact(path, artifact_path)

    def close(self, status="FINISHED"):
        pass  # a trial's run is closed by the driver's verdict (search.study.Study.close_trial)


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
    tags = {contract.ROLE: contract.ROLE_TEACHER, study.PARENT: ctx.study.run_id}
    tracker = SearchRunTracker(
        ctx.tracking_uri, cfg.experiment, run_name="teacher", tags=tags, keep=("iterations", "init")
    )
    status = "FAILED"
    try:
        train(train_cfg, tracker)
        status = "FINISHED"
    finally:
        tracker.close(status)
    return f"runs:/{tracker.run_id}/checkpoint/last.pt"


def _teacher_checkpoint(ctx: StudyContext) -> str:
    if not ctx.teacher_uri:
        raise RuntimeError("alpha > 0 or init teacher, but the study has no teacher")
    return str(mlflow_util.single_file(mlflow_util.download(ctx.teacher_uri, ctx.tracking_uri), ".pt"))


def trial_model(ctx: StudyContext, params: dict[str, Any]) -> ModelConfig:
    """The network a trial trains: its knobs on the base preset and, where the study's students
    inherit, in their teacher's topology (as trainers.train puts them), so that its cost is the
    cost of what trains."""
    model = model_config(params, ctx.search)
    if ctx.init == "teacher":
        model = in_teacher_topology(model, _network_config(_teacher_checkpoint(ctx)))
    return model


@functools.cache
def _network_config(checkpoint: str) -> ModelConfig:
    """A checkpoint's network config, read once per process (a trial asks for its teacher's for
    its cost and again for its training)."""
    return load_model(checkpoint).cfg


def student_config(ctx: StudyContext, params: dict[str, Any], iterations: int, val_every: int) -> TrainConfig:
    """The training of a student with a trial's knobs (the trial's, or its finalization's)."""
    cfg = ctx.search
    alpha = float(params.get("alpha", 0.0))
    teacher = _teacher_checkpoint(ctx) if alpha > 0 or ctx.init == "teacher" else None
    return TrainConfig(
        role="student",
        model=trial_model(ctx, params),
        teacher=teacher,
        alpha=alpha,
        init=ctx.init,
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


def _trial_weights(ctx: StudyContext, trial_run_id: str, out_dir: Path) -> tuple[str, int | None]:
    """(a local copy of the trial's last checkpoint, the step it holds), or ("", None) when the
    trial logged none. Copied into ``out_dir`` once, so that a resumed finalization names the same
    file."""
    import shutil

    from trainers.checkpoint import load_checkpoint

    local = out_dir / "trial.pt"
    if not local.exists():
        try:
            uri = f"runs:/{trial_run_id}/{study.CHECKPOINT_DIR}"
            source = mlflow_util.single_file(mlflow_util.download(uri, ctx.tracking_uri), ".pt")
        except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            print(f"finalization of {trial_run_id}: no trial checkpoint ({exc}); it starts again instead")
            return "", None
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = local.with_suffix(".partial")
        shutil.copyfile(source, partial)
        partial.replace(local)  # whole or absent
    return str(local), int(load_checkpoint(local)["step"])


def finalize_candidate(ctx: StudyContext, params: dict[str, Any], trial_run_id: str, out_dir: str) -> str:
    """Train a front candidate with its own knobs for ``finalize.iterations`` more steps, from its
    trial's last weights (``finalize.from_trial``, the default) or from the start again; returns
    the id of the finalization's run (a child of the study, tagged with its trial's run).

    Resumable: ``out_dir`` persists on the driver's node, so a study resumed after a crash continues
    from the last checkpoint there instead of starting over.
    """
    from mlflow.entities import Param

    cfg = ctx.search
    _threads(cfg.cpus_per_trial)
    n = cfg.finalize.iterations
    train_cfg = replace(student_config(ctx, params, n, min(cfg.training.val_every, n)), out_dir=out_dir)
    weights, from_step = (
        _trial_weights(ctx, trial_run_id, Path(out_dir)) if cfg.finalize.from_trial else ("", None)
    )
    train_cfg = replace(train_cfg, init_weights=weights)
    tags = {
        contract.ROLE: study.ROLE_FINALIZE,
        study.PARENT: ctx.study.run_id,
        study.TAG_FINALIZED_FROM: trial_run_id,
    }
    trial = mlflow_util.client(ctx.tracking_uri).get_run(trial_run_id)
    # named after its trial ("finalize t02 C32 r14 a0.65"), without the trial's verdict
    name = f"finalize {(trial.info.run_name or trial_run_id[:8]).split(' · ')[0]}"
    tracker = SearchRunTracker(
        ctx.tracking_uri, cfg.experiment, run_name=name, tags=tags, keep=("iterations", "init")
    )
    status = "FAILED"
    try:
        # the knobs as params, as the trial has them: selection and the cost model read them from
        # the version's run, which is this one (the tracker keeps only `keep` as params)
        knobs = [Param(k, v) for k, v in trial.data.params.items() if k in knob_names()]
        tracker.client.log_batch(tracker.run_id, params=knobs)
        # the trial's step it went on from: its weights trained that many steps before these
        tracker.client.set_tag(tracker.run_id, study.TAG_FROM_TRIAL_STEP, str(from_step or 0))
        result = train(train_cfg, tracker, resume=(Path(out_dir) / "last.pt").exists())
        status = "FINISHED"
    finally:
        tracker.close(status)
    ctx.study.log_run_metrics(trial_run_id, {FINAL_QUALITY: result.val_psnr_y})
    return tracker.run_id


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
    trial_id, _ = compat.trial_identity()
    model = trial_model(ctx, params)
    constants = {
        "flops_g": count_flops(model, 64, 64).gflops,
        "params": float(count_params(build_model(model))),
    }
    prediction = edge_cost(cfg, ctx, model, constants)
    recorded = ctx.study.prepare_rerun(trial_id, QUALITY)
    if recorded is not None:  # trained before the driver died or the trial failed; rerun by --resume
        compat.report({**constants, **recorded})
        return
    import ray

    tags = {study.TAG_NODE_ID: ray.get_runtime_context().get_node_id()}
    if prediction:
        tags[study.TAG_COST_SOURCE] = prediction[2]
    run_id = ctx.study.open_trial(trial_id, params, ctx.round, tags)
    mlflow_tracker = SearchRunTracker(ctx.tracking_uri, run_id=run_id, keep=("init",))
    try:  # from here on, whatever fails is recorded on the trial's run
        mlflow_tracker.log_metrics({"flops_g": constants["flops_g"], "params": constants["params"]}, 0)
        if prediction and prediction[2] == "costmodel":
            key, value, _ = prediction
            mlflow_tracker.log_metrics({key: value}, ctx.round)
        train_cfg = student_config(ctx, params, cfg.training.iterations, cfg.training.val_every)
        # Not in Ray's trial folder: for the first trial of each worker that folder is in the
        # driver's staging area, which Ray's experiment syncer copies to storage in the background,
        # catching (and keeping) checkpoints half-written. What the trial keeps goes to MLflow.
        with tempfile.TemporaryDirectory(prefix=f"trial-{trial_id}-", ignore_cleanup_errors=True) as out:
            train(replace(train_cfg, out_dir=out), TuneTracker(mlflow_tracker, constants))
    except Exception as exc:
        # the cause, in one line, for the verdict the driver writes (Study.close_trial)
        ctx.study.set_run_tags(run_id, {study.TAG_ERROR: f"{type(exc).__name__}: {exc}"[:500]})
        raise
