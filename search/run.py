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

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

# MLflow's usage telemetry, off unless the user turns it on, before anything imports mlflow: where
# its report cannot be sent (a cluster without internet access), its thread removes an environment
# variable while a request reads the environment, and the search failed with KeyError
# '_MLFLOW_TELEMETRY_SESSION_ID' (seen once in `ray up`'s test). Local Ray workers inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars in a log help nobody

from edge_agent import contract, errors  # noqa: E402
from edge_agent.errors import UserError  # noqa: E402
from search import compat, report, stages  # noqa: E402
from search import study as study_mod  # noqa: E402
from search.cli import config_from_args, parse_args
from search.config import ConfigError, SearchConfig
from search.mlflow_util import absolute_tracking_uri
from search.study import QUALITY, Study, StudyError, TrialRow, error_line

log = logging.getLogger("search")


def run_round(
    k: int,
    cfg: SearchConfig,
    resume: bool,
    ctx,
    storage: Path,
    ray_storage: str,
    earlier: list[TrialRow],
    ctrl_c,
) -> list:
    """Round k's trials through Ray Tune; returns Tune's results (``ray.tune.Result`` each).

    Round k > 1 starts its searcher from the earlier rounds' trials. With ``resume``, Ray's saved
    state of the round carries on (unfinished and errored trials run again), and MLflow, the
    study's record, decides what is left: saved state that cannot be read, or a searcher database
    that cannot be opened, is set aside with one sentence, and new trials make up the round's
    ``num_samples`` beside the trials MLflow has a verdict for (those are kept, not run again).
    """
    from ray import tune

    ray_name = "ray" if k == 1 else f"ray-r{k}"
    names = (ray_name, f"{ray_name}-more")  # the round's first Tune run, and the one making it up
    study_name = ctx.study.name if k == 1 else f"{ctx.study.name}-r{k}"
    if not resume:  # a new round's searcher starts from the earlier rounds' trials
        return _fresh_round(
            k, cfg, ctx, storage, ray_storage, ray_name, study_name, cfg.num_samples, earlier, earlier, ctrl_c
        )
    results = []
    for name in names:
        path = f"{ray_storage}/{name}"
        if tune.Tuner.can_restore(path):
            results += _restored(path, _trainable(cfg, ctx), k, ctrl_c)
        if ctrl_c.pressed:
            return results
    ctx.study.settle(results, k, (QUALITY, cfg.cost))  # verdicts of trials Tune had ended: counted below
    rows = ctx.study.trials(cfg.cost)
    left = cfg.num_samples - sum(r.round == k for r in rows)
    if left <= 0:
        return results
    name = next((n for n in names if not _exists(f"{ray_storage}/{n}")), None)
    if name is None:
        raise StudyFailed(
            f"round {k} needs {left} more trial(s), but {ray_storage} holds Ray's state of both of its "
            f"runs ({', '.join(names)}); move them away and resume again"
        )
    print(
        f"round {k}: MLflow holds {cfg.num_samples - left} of its {cfg.num_samples} trials; {left} new "
        "trial(s) make up the round"
    )
    # the round's searcher has its trials already (a rebuilt one gets every trial MLflow holds)
    return results + _fresh_round(k, cfg, ctx, storage, ray_storage, name, study_name, left, [], rows, ctrl_c)


def _trainable(cfg: SearchConfig, ctx):
    """A trial as Tune runs it: ``run_trial`` with the study's context and a trial's resources."""
    from ray import tune

    from search.trainable import run_trial

    return tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx), {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    )


def _scored(rows: list[TrialRow]) -> list[tuple[dict, float, float]]:
    """(knobs, PSNR, cost) of the fully trained trials among ``rows``: what seeds a searcher."""
    return [(r.knobs, r.val_psnr_y, r.cost) for r in rows if r.status == "complete"]


def _exists(path: str) -> bool:
    """Whether a Tune run's folder is there (on a remote storage: whether it can be restored)."""
    from ray import tune

    return Path(path).exists() if "://" not in path else tune.Tuner.can_restore(path)


def _restored(path: str, trainable, k: int, ctrl_c) -> list:
    """Tune's saved run at ``path``, carried on; [] after one sentence when it cannot be read (it is
    then set aside, or left where it is on a remote storage)."""
    from ray import tune

    # the scheduler and the verdict callback come back from Ray's state; a result without an
    # objective fails its trial, not the run, as in tune_run. Errored trials run again, under
    # their own ids (so in their own MLflow runs), from the start: the trials keep no Tune
    # checkpoint. The cause may be gone (a disk full, a server down); a trial that had
    # trained is reported from MLflow instead (Study.prepare_rerun)
    compat.tolerate_missing_metrics()
    compat.quiet_state_copy_race()
    try:
        with ctrl_c.during_fit():
            tuner = tune.Tuner.restore(
                path, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
            )
            return list(tuner.fit())
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        where = "left where it is"
        if "://" not in path:
            aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(path, aside)
            where = f"set aside as {aside}"
        print(
            f"round {k}: Ray's saved state in {path} cannot be read ({error_line(exc)}); {where}. What is "
            "left of the round is decided from MLflow"
        )
        return []


def goal_of(cfg: SearchConfig):
    """The SR search as the engine sees it: PSNR-Y up, the config's cost down, rungs at the
    validation steps, a trial fully trained at ``training.iterations``."""
    from search import engine

    t = cfg.training
    return engine.Objectives(QUALITY, cfg.cost, "step", t.iterations, t.val_every, "dB")


def _searcher(cfg: SearchConfig, study_name: str, storage: Path, k: int, known: list[TrialRow]):
    """The round's searcher on its Optuna database; a database that cannot be opened is set aside
    and a new one is seeded with the trials MLflow holds (the searcher's model starts again from
    those)."""
    import functools

    from search import engine, loop
    from search.space import define_space

    db = storage / "optuna.db"
    try:
        import optuna

        optuna.storages.RDBStorage(f"sqlite:///{db}").get_all_studies()
    except Exception as exc:
        aside = db.with_name(f"optuna.db.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(db, aside)
        added = loop.seed_study(storage, study_name, cfg, _scored(known))
        print(
            f"round {k}: the searcher's database {db} cannot be opened ({error_line(exc)}); set aside as "
            f"{aside}. The searcher starts again from the {added} fully trained trial(s) MLflow holds"
        )
    space = functools.partial(define_space, cfg=cfg)
    return engine.make_searcher(
        cfg.searcher,
        space,
        goal_of(cfg),
        cfg.seed,
        cfg.startup_trials,
        study_name=study_name,
        storage_dir=storage,
    )


def _fresh_round(k, cfg, ctx, storage, ray_storage, ray_name, study_name, n, seed, known, ctrl_c) -> list:
    """A new Tune run of ``n`` trials for round k. ``seed``: trials the searcher starts from (the
    earlier rounds', for a new round); ``known``: what a searcher rebuilt from a damaged database
    starts from."""
    from ray import tune

    from search import engine, loop
    from search.callbacks import VerdictCallback

    if seed:
        added = loop.seed_study(storage, study_name, cfg, _scored(seed))
        print(f"round {k}: the searcher starts from {added} earlier trials, re-scored with the current cost")
    goal = goal_of(cfg)
    es = cfg.early_stopping  # a StoppingRule
    scheduler = engine.make_scheduler("pareto" if es.enabled else "none", goal, es)
    reporter = tune.CLIReporter(
        metric_columns=["step", QUALITY, cfg.cost], parameter_columns=[k.name for k, _ in cfg.space.ranges()]
    )
    searcher = _searcher(cfg, study_name, storage, k, known)
    with ctrl_c.during_fit():
        return list(
            engine.tune_run(
                _trainable(cfg, ctx),
                searcher,
                scheduler,
                n,
                ray_name,
                ray_storage,
                max_concurrent=cfg.max_concurrent,
                callbacks=[VerdictCallback(ctx.study, k, scheduler, (QUALITY, cfg.cost))],
                progress_reporter=reporter,
            )
        )


class StudyFailed(UserError, RuntimeError):
    """Every trial of a round failed: there is nothing to register, and the exit code says so."""


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
        return errors.fail(exc, "config error")
    problem = contract.credential_problem(None)  # the config's URI is checked; here the environment's
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    import ray

    from edge_agent import preflight
    from model.runtime import keep_freed_memory
    from search import loop, resources

    keep_freed_memory()
    tracking_uri = absolute_tracking_uri(cfg.tracking_uri)
    preflight.limit_mlflow_retries()  # before ray.init: a local Ray's workers inherit it
    problem = preflight.tracking_server_problem(tracking_uri)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        resumed = Study.find(cfg, tracking_uri) if args.resume else None
    except StudyError as exc:
        return errors.fail(exc, "config error")
    # Ray first: a request no node can hold fails before a study run or LATEST is written
    ray.init(address=cfg.address, include_dashboard=False)
    local = cfg.address in (None, "local")  # a Ray this process starts cannot grow
    problem = resources.trial_fit_problem(cfg.cpus_per_trial, cfg.gpus_per_trial, local=local)
    if problem:  # Ray would queue the teacher and every trial forever
        print(f"error: {problem}", file=sys.stderr)
        ray.shutdown()
        return 1
    if resumed is not None and resumed.reopen():
        print("marked the interrupted study's unfinished runs KILLED; their trials rerun")
    study = resumed or Study.start(cfg, tracking_uri)
    print(f"study {study.name}: MLflow run {study.run_id} in experiment '{cfg.experiment}' at {tracking_uri}")
    status, stage = "FAILED", ["starting"]
    flags = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    resume_hint = f"python search/run.py {shlex.join([*flags, '--resume'])}"
    reported = False
    try:
        summary, champion, timings = run_study(cfg, study, args.resume, stage)
        if args.json:
            rule = loop.cost_rule(cfg, study.tracking_uri, study.experiment_id)
            rows = report.with_front(
                loop.costed(study.trials(cfg.cost, model_name=cfg.registry.model_name), cfg, rule)
            )
            result = {
                "study": study.name,
                "study_run_id": study.run_id,
                "summary": summary,
                "champion": champion,
                "timings_s": timings,
                "trials": [asdict(r) for r in rows],
            }
            Path(args.json).write_text(json.dumps(result, indent=2))
        status = "FINISHED"
        return 0
    except StudyFailed as exc:
        return errors.fail(exc)
    except ConfigError as exc:  # found once Ray is up: the teacher cannot be fetched
        return errors.fail(exc, "config error")
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"interrupted: continue with `{resume_hint}` (the same flags, and --resume)", file=sys.stderr)
        return 130
    except Exception as exc:
        why = _lost_resource(exc, tracking_uri)
        if why is None:
            raise  # a fault of the search itself: its traceback is what to report
        reported = True
        print(
            f"error: while {stage[0]}, {why[0]}; what was logged before is kept: {why[1]}, then continue "
            f"with `{resume_hint}`",
            file=sys.stderr,
        )
        return 1
    finally:
        try:
            study.close(status)
        except Exception as exc:
            why = _lost_resource(exc, tracking_uri)
            if why is None:
                raise
            if not reported:
                print(
                    f"error: study {study.name} could not be marked {status}: {why[0]}; {why[1]} (a "
                    "--resume marks it again)",
                    file=sys.stderr,
                )
        ray.shutdown()


def _lost_resource(exc: BaseException, tracking_uri: str) -> tuple[str, str] | None:
    """(what was lost, what to do) when the study could not go on because something outside it
    failed: a full disk, a tracking server that stopped answering; None for any other failure."""
    import errno

    from edge_agent import preflight

    seen = exc
    while seen is not None:  # the OSError may be the cause of what MLflow or Ray raised
        words = (os.strerror(errno.ENOSPC), "database or disk is full")  # the OS's, SQLite's
        said = [line.strip() for line in str(seen).splitlines() if any(w in line for w in words)]
        if said or (isinstance(seen, OSError) and seen.errno == errno.ENOSPC):
            return f"the disk filled up ({(said or [error_line(seen)])[0][:300]})", "free some space"
        seen = seen.__cause__ or seen.__context__
    if preflight.tracking_server_problem(tracking_uri):
        return f"the tracking server at {tracking_uri} stopped answering", "start it again"
    return None


def run_study(
    cfg: SearchConfig, study: Study, resume: bool, stage: list[str]
) -> tuple[dict, dict | None, dict]:
    """The teacher, then each round not done yet (search, register, measure), then the champion.

    Returns (the summary of the last round, the champion or None, the stages' wall times). A local
    edge agent runs only while a round waits for its measurements (``loop.measure``); ``stage[0]``
    says what the study is doing, for an error message.
    """
    from search import loop
    from search.costmodel import TARGETS
    from search.trainable import StudyContext

    ctrl_c = compat.CtrlC()
    storage = Path(cfg.storage_dir).resolve() / study.name
    edge_cost = cfg.cost in TARGETS
    wait = edge_cost or cfg.loop.local_agent or cfg.loop.select
    timings, summary = {}, {}
    t0 = time.monotonic()
    stage[0] = "preparing the teacher"
    teacher_uri = stages.ensure_teacher(cfg, study, storage)
    timings["teacher_s"] = time.monotonic() - t0
    init, why = stages.student_init(cfg, study, teacher_uri)
    start = "from the teacher's weights" if init == "teacher" else "from scratch"
    print(f"students start {start}: {why}")
    study.describe("Students", f"Start {start}: {why}.")
    ray_storage = f"{cfg.ray_storage.rstrip('/')}/{study.name}" if cfg.ray_storage else str(storage)
    for k in range(study.rounds_done() + 1, cfg.loop.rounds + 1):
        # the round's cost rule, from the measurements so far; the earlier rounds' trials under it
        rule = loop.cost_rule(cfg, study.tracking_uri, study.experiment_id)
        model = rule.model if rule else None
        rows = loop.costed(study.trials(cfg.cost, model_name=cfg.registry.model_name), cfg, rule)
        if edge_cost:
            print(loop.cost_model_line(k, cfg, model, rule.n))
        ctx = StudyContext(
            cfg.to_dict(),
            study,
            teacher_uri,
            round=k,
            cost_model=model.to_dict() if model else None,
            init=init,
        )
        t0 = time.monotonic()
        stage[0] = f"running round {k}'s trials"
        results = run_round(k, cfg, resume, ctx, storage.parent, ray_storage, rows, ctrl_c)
        if ctrl_c.pressed:  # Tune saved its state and returned
            raise KeyboardInterrupt
        timings[f"round{k}_search_s"] = time.monotonic() - t0
        study.settle(results, k, (QUALITY, cfg.cost))
        rows = loop.costed(study.trials(cfg.cost, model_name=cfg.registry.model_name), cfg, rule)
        if all(r.status == "failed" for r in rows if r.round == k):
            raise StudyFailed(_all_failed_message(results, k, ray_storage))
        t0 = time.monotonic()
        stage[0] = f"registering and reporting round {k}'s front"
        rows = report.with_front(rows)
        if cfg.registry.register:
            rows = stages.register_front(rows, cfg, study, ctx, storage / "finalize")
        summary = report.write_report(study, rows, cfg.cost, cfg.experiment, storage / "report")
        study.describe(
            "Result", report.describe_result(rows, summary, cfg.cost, experiment_id=study.experiment_id)
        )
        print(report.format_table(rows, cfg.cost))
        timings[f"round{k}_register_s"] = time.monotonic() - t0
        # the front's versions not measured yet: registered now, or before a kill that came first
        todo = [str(r.version) for r in rows if r.version] if wait else []
        todo = loop.unmeasured(study.tracking_uri, cfg.registry.model_name, todo, cfg.loop.device)
        if todo:
            t0 = time.monotonic()
            stage[0] = f"waiting for round {k}'s measurements"
            loop.measure(study.tracking_uri, cfg, todo, storage / "agent")  # a local agent runs only now
            timings[f"round{k}_measure_s"] = time.monotonic() - t0
        if edge_cost:
            errors = loop.log_round(study, cfg, k)
            print(f"round {k}: cost model after this round's measurements: {json.dumps(errors)}")
        study.round_done(k)
    if not summary:  # every round was done before this --resume
        summary = study.read_json(study_mod.SUMMARY_ARTIFACT) or {}
    print(json.dumps(summary))
    champion = None
    if cfg.loop.select:
        t0 = time.monotonic()
        stage[0] = "selecting the champion"
        champion = stages.select(cfg, study)
        timings["select_s"] = time.monotonic() - t0
    study.log_json(timings, study_mod.TIMINGS_ARTIFACT)
    print("stage wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    page = study_mod.run_page(study.experiment_id, study.run_id)
    if cfg.tracking_uri.startswith("sqlite:///"):
        print(f"see everything in the MLflow UI: mlflow ui --backend-store-uri {cfg.tracking_uri}, then")
        print(f"  http://127.0.0.1:5000/{page}")
    elif cfg.tracking_uri.startswith("http"):
        print(f"see everything in the MLflow UI: {cfg.tracking_uri.rstrip('/')}/{page}")
    if cfg.tracking_uri.startswith(("sqlite:///", "http")):
        print(f"  {study_mod.UI_VIEW_NOTE}")
    return summary, champion, timings


def _all_failed_message(results, k: int, ray_storage: str) -> str:
    errors = [r.error for r in results if r.error]
    first = error_line(errors[0]) if errors else "none recorded"
    return (
        f"all {len(errors)} trials of round {k} failed, so nothing was registered; the first error: "
        f"{first[:300]} (full tracebacks: error.txt in the trial folders under {ray_storage})"
    )


if __name__ == "__main__":
    sys.exit(main())
