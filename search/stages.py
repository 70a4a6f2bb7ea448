"""The stages of a study around its trials: the teacher before them; after them, the front's
registration (with its finalization) and the choice of a champion.

Each stage records what it did on the study run (through ``search.study.Study``), so a resumed
study skips what is done: the teacher's URI is a tag, a registered trial has its version.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edge_agent import contract
from search import mlflow_util
from search import study as study_mod
from search.config import ConfigError, SearchConfig
from search.study import Study, TrialRow


def ensure_teacher(cfg: SearchConfig, study: Study, storage: Path) -> str | None:
    """The runs:/ URI of the study's teacher: given (a file, an MLflow URI, or ``dvmsr``), already
    trained, or trained now (once, as a Ray task with a trial's resources)."""
    import torch

    from model import dvmsr

    if cfg.space.alpha.high == 0:
        return None  # no distillation in this space
    if study.teacher_uri:
        return study.teacher_uri
    given = cfg.teacher.checkpoint
    if given and dvmsr.is_spec(given):  # DVMSR's published weights, logged once for every trial
        path = dvmsr.resolve(given)
        teacher_uri = study.log_artifact(path, "teacher")
        source = torch.load(path, map_location="cpu", weights_only=True).get("source", {})
        study.set_tags(
            {
                f"{study_mod.TAG_TEACHER}.{k}": str(source[k])
                for k in ("file", "sha256", "repository")
                if k in source
            }
        )
    elif given and (given.startswith(("runs:/", "models:/", "mlflow-artifacts:")) or "://" in given):
        teacher_uri = given
    elif given:
        if not Path(given).is_file():
            raise ConfigError(f"teacher.checkpoint {given} does not exist")
        teacher_uri = study.log_artifact(given, "teacher")
    else:
        import ray

        from search.trainable import StudyContext, train_teacher

        print(f"training the study's teacher ({cfg.teacher.preset}, {cfg.teacher.iterations} steps)")
        ctx = StudyContext(cfg.to_dict(), study, teacher_uri=None)
        task = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)(train_teacher)
        teacher_uri = ray.get(task.remote(ctx, str(storage / "teacher")))
    from mlflow.exceptions import MlflowException

    try:
        checkpoint = mlflow_util.single_file(mlflow_util.download(teacher_uri, study.tracking_uri), ".pt")
    except (MlflowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        raise ConfigError(
            f"{teacher_uri} cannot be fetched from {study.tracking_uri} ({first})", "teacher.checkpoint"
        ) from None
    psnr = teacher_val_psnr(cfg, checkpoint, given or teacher_uri)
    study.log_metrics({"teacher_val_psnr_y": psnr})
    study.set_tags({study_mod.TAG_TEACHER_URI: teacher_uri})  # last: a resumed study trusts it
    print(f"teacher {teacher_uri}: validation PSNR-Y {psnr:.2f} dB (the students' validation images)")
    return teacher_uri


def student_init(cfg: SearchConfig, study: Study, teacher_uri: str | None) -> tuple[str, str]:
    """Where the study's students start: ("teacher" or "scratch", why), one choice for the whole
    study so that its trials compare like with like. ``training.init: auto`` takes the teacher when
    every student of the space fits inside it (model/inherit.py), else scratch, saying why.

    Raises:
        ConfigError: ``training.init: teacher`` where the students cannot inherit.
    """
    from model.inherit import compatibility_problem
    from model.mambalitesr import load_model

    asked = cfg.training.init
    if asked == "scratch":
        return "scratch", "training.init is scratch"
    if teacher_uri is None:
        problem = "the study has no teacher (space.alpha allows no distillation)"
    else:
        checkpoint = mlflow_util.single_file(mlflow_util.download(teacher_uri, study.tracking_uri), ".pt")
        teacher = load_model(str(checkpoint)).cfg
        widest = widest_student(cfg)
        problem = compatibility_problem(teacher, widest)
        if problem is None:
            return "teacher", (
                f"every student of the space fits inside the teacher (embed dim {teacher.embed_dim}, "
                f"{teacher.n_groups}x{teacher.blocks_per_group} blocks, d_state {teacher.d_state})"
            )
        problem = f"for the widest student of the space, {problem}"
    if asked == "teacher":
        raise ConfigError(f"teacher, but {problem}", "training.init")
    return "scratch", problem


def widest_student(cfg: SearchConfig):
    """The largest network the space can draw: every network knob at its highest but the rank (any
    rank inherits); the teacher must hold it for the students to start from its weights."""
    from search.space import model_config

    return model_config(
        {k.name: r.high for k, r in cfg.space.ranges() if k.network and k.name != "rank"}, cfg
    )


def teacher_val_psnr(cfg: SearchConfig, checkpoint: Path, name: str) -> float:
    """The teacher's PSNR-Y on the trials' validation images, so its strength is on record.

    Raises:
        ConfigError: the teacher upscales by another factor than the students (``name`` says
            which teacher: what the config gave, or the URI it was logged at).
    """
    import torch

    from model.mambalitesr import PRESETS, load_model
    from trainers.data import load_sets, require_measurable
    from trainers.train import validate

    net = load_model(str(checkpoint))
    scale = PRESETS[cfg.base_model].scale
    if net.cfg.scale != scale:
        raise ConfigError(
            f"{name} is a x{net.cfg.scale} model but the students ({cfg.base_model}) are x{scale}; "
            f"give a x{scale} teacher, or none to train one",
            "teacher.checkpoint",
        )
    pairs = load_sets(list(cfg.training.val_data), "val", net.cfg.scale)
    if cfg.training.val_max_images:
        pairs = pairs[: cfg.training.val_max_images]
    require_measurable(pairs, net.cfg.scale)  # before any trial trains for hours to be measured
    return validate(net, pairs, torch.device("cpu"))[study_mod.QUALITY]


def register_front(rows: list[TrialRow], cfg: SearchConfig, study: Study, ctx, root: Path) -> list[TrialRow]:
    """Register every front row not registered yet (after its finalization when
    ``finalize.iterations``); returns the rows, each front row with its ``version``. The
    finalizations run side by side, each with a trial's resources, as many at once as the cluster
    holds; registration follows in front order."""
    from search.registry import register_candidate, version_of_trial

    front = [r for r in rows if r.on_front and r.run_id is not None]
    registered = {
        r.run_id: version_of_trial(study.tracking_uri, cfg.registry.model_name, r.run_id) for r in front
    }
    waits = {}
    if cfg.finalize.iterations:
        finalize = _finalizer(cfg, ctx, root)
        waits = {r.run_id: finalize(r) for r in front if registered[r.run_id] is None}
    versions = {}
    for r in front:
        weights = waits[r.run_id]() if r.run_id in waits else None
        reg = register_candidate(
            study.tracking_uri,
            r.run_id,
            cfg.registry.model_name,
            cfg.registry.devices,
            cfg.registry.input_size,
            weights_run_id=weights,
            label=r.name,
            fp16=cfg.registry.fp16,
        )
        versions[r.run_id] = int(reg.version)
    return [dataclasses.replace(r, version=versions[r.run_id]) if r.run_id in versions else r for r in rows]


def _finalizer(cfg: SearchConfig, ctx, root: Path):
    """finalize(row) starts the row's knobs retraining for finalize.iterations steps as a Ray task
    (with a trial's resources), into ``root/<trial id>`` so that --resume continues it, and returns
    wait(): it blocks until the retraining is done and returns its run id."""
    import ray

    from search.study import FINAL_QUALITY
    from search.trainable import finalize_candidate

    task = ray.remote(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)(finalize_candidate)

    def finalize(row: TrialRow):
        print(f"finalizing {row.name or row.trial_id}: {cfg.finalize.iterations} steps")
        ref = task.remote(ctx, row.knobs, row.run_id, str(root / row.trial_id))

        def wait() -> str:
            run_id = ray.get(ref)
            final = mlflow_util.client(ctx.tracking_uri).get_run(row.run_id).data.metrics.get(FINAL_QUALITY)
            print(
                f"finalized {row.name or row.trial_id}: {FINAL_QUALITY} {final:.2f} dB "
                f"(the trial reached {row.val_psnr_y:.2f})"
            )
            return run_id

        return wait

    return finalize


def select(cfg: SearchConfig, study: Study) -> dict | None:
    """Selection at the end of the loop; a study with nothing measurable is reported, not fatal."""
    from search.selection import SelectionError, select_champion, table

    try:
        sel = select_champion(
            study.tracking_uri,
            cfg.experiment,
            device=cfg.loop.device,
            rule=cfg.loop.select_rule,
            model_name=cfg.registry.model_name,
            study_run_id=study.run_id,
        )
    except SelectionError as exc:
        print(f"selection: {exc}")
        study.describe("Champion", f"None chosen: {exc}")
        return None
    print(table(sel.rows))
    print(sel.message)
    return sel.to_dict()


def champion_uri(model_name: str = contract.REGISTERED_MODEL) -> str:
    return f"models:/{model_name}@{contract.CHAMPION_ALIAS}"
