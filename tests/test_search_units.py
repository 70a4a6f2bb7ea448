"""Search pieces without Ray running: config, space, early-stopping rule, Pareto front, searcher."""

import dataclasses
import math
from pathlib import Path

import optuna
import pytest

from edge_agent import contract
from search import compat, mlflow_util, study
from search.config import ConfigError, IntRange, load_config
from search.pareto import dominates, hypervolume_2d, pareto_front
from search.scheduler import ParetoRungScheduler, RungPoint, dominated_at_rung
from search.searcher import BudgetAwareOptunaSearch
from search.space import define_space, model_config
from search.study import fully_trained


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_default_and_smoke_configs_load():
    cfg = load_config()
    assert cfg.searcher == "random" and cfg.space.alpha.high == 1.0 and cfg.cost == "flops_g"
    smoke = load_config(load_config.__globals__["CONFIG_DIR"] / "smoke.yaml")
    assert smoke.base_model == "tiny" and smoke.training.iterations < cfg.training.iterations


@pytest.mark.parametrize(
    "text,match",
    [
        ("num_sampels: 3\n", r"unknown key\(s\) \['num_sampels'\]"),
        ("space:\n  embed_dim: {low: 8, hihg: 16}\n", r"space.embed_dim: unknown key.*hihg"),
        ("searcher: grid\n", "searcher: must be one of"),
        ("startup_trials: 1\n", "startup_trials: must be at least 2"),
        ("num_samples: many\n", "num_samples: must be int"),
        ("space:\n  alpha: {low: -0.5, high: 1.0}\n", r"space.alpha: must lie in \[0, 1\]"),
        ("training: {iterations: 10, val_every: 20}\n", "training.val_every: must not exceed"),
        ("registry: {devices: ['orin nano']}\n", "registry.devices"),
        ("teacher: {preset: giant}\n", "teacher.preset"),
        ("- a list\n", "mapping at the top level"),
        ("space: [1, 2]\n", "space: must be a mapping"),
        (
            "registry: {register: false}\nloop: {select: true}\n",
            r"registry.register: false, but loop.select needs",
        ),
        (
            "registry: {register: false}\ncost: edge_latency\n",
            "but cost edge_latency needs the front's registered",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_cli_config_error_exits_2(tmp_path, capsys):
    from search.run import main

    assert main(["--config", str(write(tmp_path, "searcher: grid\n"))]) == 2
    assert "searcher: must be one of" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse refuses the flag, naming it
        main(["--smoke-test", "--num-samples", "0"])
    assert exc.value.code == 2 and "--num-samples" in capsys.readouterr().err


def test_no_register_is_refused_beside_what_needs_the_registered_front(capsys):
    from search.cli import config_from_args, parse_args

    cfg = config_from_args(parse_args(["--smoke-test", "--no-register", "--no-local-agent", "--no-select"]))
    assert cfg.registry.register is False and config_from_args(parse_args(["--smoke-test"])).registry.register
    with pytest.raises(ConfigError, match="but loop.local_agent and loop.select need the front's registered"):
        config_from_args(
            parse_args(["--smoke-test", "--no-register"])
        )  # the smoke config measures and selects


def test_data_and_teacher_flags_set_their_keys_and_missing_folders_are_named(tmp_path):
    from search.cli import config_from_args, parse_args

    (tmp_path / "a").mkdir()
    (tmp_path / "v").mkdir()
    (tmp_path / "w.pth").write_bytes(b"x")
    argv = ["--config", str(Path(__file__).parents[1] / "search" / "configs" / "cpu.yaml")]
    argv += ["--train-data", str(tmp_path / "a"), "--val-data", str(tmp_path / "v")]
    cfg = config_from_args(parse_args([*argv, "--teacher", f"dvmsr:{tmp_path / 'w.pth'}"]))
    assert cfg.training.train_data == (str(tmp_path / "a"),)
    assert cfg.training.val_data == (str(tmp_path / "v"),)
    assert cfg.teacher.checkpoint == f"dvmsr:{tmp_path / 'w.pth'}" and cfg.training.init == "teacher"
    assert cfg.loop.local_agent and cfg.loop.select and cfg.registry.devices == ("local-cpu",)
    with pytest.raises(ConfigError, match=r"training.val_data: .*nope is not a folder"):
        config_from_args(parse_args([*argv[:4], "--val-data", str(tmp_path / "nope")]))
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        config_from_args(parse_args([*argv, "--teacher", f"dvmsr:{tmp_path / 'none.pth'}"]))


def test_main_saves_rays_state_at_every_step_under_the_entry_point_too(tmp_path, monkeypatch):
    """mambalitesr-search calls main() without running search/run.py as __main__: main() itself sets
    TUNE_GLOBAL_CHECKPOINT_S (before the config is read, so a config error here shows it), and keeps
    a value the user set."""
    import os

    from search.run import main

    bad = str(write(tmp_path, "searcher: grid\n"))
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "set by the test")  # undone after the test
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S")
    assert main(["--config", bad]) == 2
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "0"
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "30")
    assert main(["--config", bad]) == 2
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "30"


def test_space_bounds_rank_by_inner_width():
    cfg = load_config(
        overrides={"space": {"embed_dim": {"low": 2, "high": 4, "step": 2}, "rank": {"low": 1, "high": 64}}}
    )
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    for _ in range(30):
        trial = study.ask()
        define_space(trial, cfg)
        p = trial.params
        assert p["embed_dim"] in (2, 4) and 1 <= p["rank"] <= 2 * p["embed_dim"] and 0 <= p["alpha"] <= 1
        m = model_config(p, cfg)
        assert m.embed_dim == p["embed_dim"] and m.rank == p["rank"] and m.n_groups == 4  # student base
        study.tell(trial, [0.0, 0.0])


def test_dominance_and_front_by_hand():
    assert dominates((30.0, 1.0), (29.0, 1.0), ("max", "min"))
    assert not dominates((30.0, 2.0), (29.0, 1.0), ("max", "min"))
    assert not dominates((30.0, 1.0), (30.0, 1.0), ("max", "min"))
    points = [(28.0, 1.0), (29.0, 2.0), (28.5, 2.5), (30.0, 4.0), (27.0, 0.5), (30.0, 4.0)]
    assert pareto_front(points, ("max", "min")) == [0, 1, 3, 4, 5]


def test_hypervolume_by_hand():
    # reference (quality 26, cost 5); points (28, 1) and (30, 3):
    # cost 1..3 at height 28-26=2 -> 4, cost 3..5 at height 30-26=4 -> 8; total 12
    assert hypervolume_2d([(28.0, 1.0), (30.0, 3.0)], (26.0, 5.0)) == pytest.approx(12.0)
    assert hypervolume_2d([(28.0, 1.0), (27.0, 2.0), (30.0, 3.0)], (26.0, 5.0)) == pytest.approx(12.0)
    assert hypervolume_2d([(25.0, 1.0), (30.0, 6.0)], (26.0, 5.0)) == 0.0


def test_early_stopping_rule_on_constructed_rungs():
    cheap_good = RungPoint("a", quality=27.0, cost=1.0)
    cheap_bad = RungPoint("b", quality=26.0, cost=1.0)
    tiny_weak = RungPoint("c", quality=25.0, cost=0.5)  # cheaper than everyone: never dominated
    big_weak = RungPoint("d", quality=26.5, cost=3.0)  # costlier and worse than "a": dominated
    big_best = RungPoint("e", quality=28.0, cost=3.0)
    peers = [cheap_good, cheap_bad, tiny_weak, big_weak, big_best]
    assert dominated_at_rung(cheap_bad, peers)
    assert not dominated_at_rung(tiny_weak, peers)  # ASHA on PSNR alone would stop it
    assert dominated_at_rung(big_weak, peers)
    assert not dominated_at_rung(big_best, peers) and not dominated_at_rung(cheap_good, peers)
    assert not dominated_at_rung(cheap_bad, peers, margin=1.5)


class FakeTrial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_scheduler_stops_only_dominated_trials_after_min_rung():
    s = ParetoRungScheduler("q", "c", "step", min_rung=2, unit="dB")  # the SR search's goal
    r = lambda q, c, step: {"q": q, "c": c, "step": step}  # noqa: E731
    assert s.on_trial_result(None, FakeTrial("a"), r(27.0, 1.0, 10)) == "CONTINUE"
    assert s.on_trial_result(None, FakeTrial("b"), r(20.0, 2.0, 10)) == "CONTINUE"  # rung 1 < min_rung
    assert s.on_trial_result(None, FakeTrial("a"), r(28.0, 1.0, 20)) == "CONTINUE"
    assert s.on_trial_result(None, FakeTrial("c"), r(22.0, 0.5, 10)) == "CONTINUE"
    assert s.on_trial_result(None, FakeTrial("b"), r(21.0, 2.0, 20)) == "STOP"
    assert s.on_trial_result(None, FakeTrial("c"), r(22.5, 0.5, 20)) == "CONTINUE"  # cheapest
    assert s.stopped == [("b", 20)]
    # the reason names the peer that dominated it at that rung, by its label
    assert s.reason("b", {"a": "t00 C8 r2 a0.50"}) == (
        "at step 20, t00 C8 r2 a0.50 reached 28.00 dB at cost 1 (no more than this trial's 2) "
        "against this trial's 21.00 dB"
    )
    assert s.reason("a") is None and s.reason("c") is None


def test_searcher_counts_only_fully_trained_trials(tmp_path):
    cfg = load_config(load_config.__globals__["CONFIG_DIR"] / "smoke.yaml")
    from search import run

    searcher = run._searcher(cfg, "unit", tmp_path, 1, [])  # the SR search's, through search.engine
    from search import engine

    goal = engine.Objectives(
        "val_psnr_y", cfg.cost, "step", cfg.training.iterations, cfg.training.val_every, "dB"
    )
    assert run.goal_of(cfg) == goal
    # one type for the scheduler's settings: the config's early_stopping is the engine's rule, plus enabled
    assert isinstance(cfg.early_stopping, engine.StoppingRule) and cfg.early_stopping.enabled
    assert engine.make_scheduler("pareto", goal, cfg.early_stopping).min_rung == cfg.early_stopping.min_rung
    assert isinstance(searcher, BudgetAwareOptunaSearch)
    searcher.set_search_properties(None, None, {})
    for tid in ("full", "stopped", "crashed", "never"):
        assert searcher.suggest(tid)["embed_dim"] in (4, 8, 12)
    iters = cfg.training.iterations
    searcher.on_trial_complete("full", {"val_psnr_y": 20.0, "flops_g": 0.1, "step": iters})
    searcher.on_trial_complete("stopped", {"val_psnr_y": 25.0, "flops_g": 0.05, "step": 4})
    searcher.on_trial_complete("crashed", {"val_psnr_y": 26.0, "flops_g": 0.05, "step": 4}, error=True)
    states = {t.number: t.state for t in compat.optuna_study(searcher).trials}
    assert sorted(s.name for s in states.values()) == ["COMPLETE", "FAIL", "PRUNED", "RUNNING"]
    (complete,) = [t for t in compat.optuna_study(searcher).trials if t.state.name == "COMPLETE"]
    assert complete.values == [20.0, 0.1]
    assert fully_trained(8, 8) and not fully_trained(4, 8) and not fully_trained(None, 8)
    assert (tmp_path / "optuna.db").exists() and not math.isnan(complete.values[0])


def _study(tmp_path, name="s") -> study.Study:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = study.ensure_experiment(uri, name)
    parent = mlflow_util.client(uri).create_run(exp_id, tags={contract.ROLE: contract.ROLE_STUDY}).info.run_id
    return study.Study(uri, exp_id, parent, name, iterations=8)


def test_each_trial_run_gets_one_verdict_from_what_tune_saw(tmp_path):
    """A run left KILLED (driver killed before the callback, then --resume) ends as Tune saw its
    trial end; a verdict once written is not rewritten (a second close does nothing); a trial that
    failed before it opened its run gets one; collecting (``trials``) writes nothing."""
    from types import SimpleNamespace

    s = _study(tmp_path)
    c = mlflow_util.client(s.tracking_uri)

    def result(trial_id, step, error=None):
        metrics = {"trial_id": trial_id, "step": step, "val_psnr_y": 25.0}
        return SimpleNamespace(
            metrics=metrics, path=None, error=error, config={"embed_dim": 16, "rank": 2, "alpha": 0.5}
        )

    killed = s.open_trial("x_00001", {"embed_dim": 16, "rank": 2, "alpha": 0.5})
    c.set_terminated(killed, status="KILLED")
    s.open_trial("x_00002", {"embed_dim": 8, "rank": 2, "alpha": 0.1})
    assert s.close_trial("x_00002", {"step": 4}, reason="at step 4, t01 ... dominated it")
    crashed = s.open_trial("x_00003", {"embed_dim": 8, "rank": 4, "alpha": 0.2})
    c.set_tag(crashed, study.TAG_ERROR, "ValueError: teacher scale x2")
    results = [result("x_00001", 8), result("x_00002", 8), result("x_00003", 2, RuntimeError("boom"))]
    results.append(result("x_00004", 0, RuntimeError("never opened")))
    assert s.settle(results, 1) == 3  # x_00002 had its verdict

    every = mlflow_util.all_pages(c.search_runs, [s.experiment_id])
    runs = {r.data.tags[study.TAG_TRIAL_ID]: r for r in every if study.TAG_TRIAL_ID in r.data.tags}
    status = {t: (r.info.status, r.data.tags[study.TAG_VERDICT]) for t, r in runs.items()}
    assert status == {
        "x_00001": ("FINISHED", "complete"),
        "x_00002": ("FINISHED", "stopped"),  # not rewritten as complete by the later result
        "x_00003": ("FAILED", "failed"),
        "x_00004": ("FAILED", "failed"),
    }
    assert runs["x_00002"].data.tags[study.TAG_STOP_REASON] == "at step 4, t01 ... dominated it"
    assert runs["x_00002"].info.run_name == "C8 r2 a0.10 · stopped@4"  # closed without a number
    assert runs["x_00001"].info.run_name == "t01 C16 r2 a0.50"  # settle numbers them in Tune's order
    assert runs["x_00004"].info.run_name == "t04 C16 r2 a0.50 · failed"
    assert runs["x_00002"].data.tags[study.TAG_EARLY_STOPPED] == "true"
    assert runs["x_00001"].data.tags[study.TAG_EARLY_STOPPED] == "false"
    assert runs["x_00003"].data.tags[study.TAG_ERROR] == "ValueError: teacher scale x2"  # the worker's
    assert runs["x_00004"].data.tags[study.TAG_ERROR] == "RuntimeError: never opened"
    assert runs["x_00001"].data.params == {"embed_dim": "16", "rank": "2", "alpha": "0.5"}  # once each

    before = [(r.info.status, r.data.tags) for r in every]
    rows = s.trials("flops_g")
    assert [r.status for r in rows] == ["complete", "stopped", "failed", "failed"]
    assert (
        rows[1].step == 4
        and rows[0].step == 8
        and rows[0].knobs == {"embed_dim": 16, "rank": 2, "alpha": 0.5}
    )
    after = [(r.info.status, r.data.tags) for r in mlflow_util.all_pages(c.search_runs, [s.experiment_id])]
    assert sorted(map(str, before)) == sorted(map(str, after))


def test_a_trial_done_before_a_crash_is_reported_not_retrained(tmp_path):
    """After --resume, Ray may rerun a trial MLflow already has a verdict for: complete or stopped
    early, its recorded result is reported again; a run cut off mid-training is trained again. A
    failed trial runs again (its failed verdict goes), unless it had trained fully and logged its
    checkpoint before failing: then its result is reported."""
    s = _study(tmp_path, "rerun")
    c = mlflow_util.client(s.tracking_uri)
    weights = tmp_path / "last.pt"
    weights.write_bytes(b"weights")

    def run(
        trial_id: str, steps: list[int], status: str | None, verdict_step: int | None = None, **kw
    ) -> None:
        run_id = s.open_trial(trial_id, {"embed_dim": 8, "rank": 2, "alpha": 0.5})
        for step in steps:
            c.log_metric(run_id, "val_psnr_y", 20.0 + step, step=step)
        if kw.get("checkpoint"):
            c.log_artifact(run_id, str(weights), study.CHECKPOINT_DIR)
        if kw.get("error"):
            s.close_trial(trial_id, {"step": steps[-1]}, error=kw["error"])
        elif verdict_step is not None:
            s.close_trial(trial_id, {"step": verdict_step})
        elif status:
            c.set_terminated(run_id, status=status)

    run("full", [2, 4, 6, 8], None, verdict_step=8)
    run("stopped", [2, 4], None, verdict_step=4)
    run("cut", [2, 4], "KILLED")
    run("cut-finished", [2, 4], "FINISHED")  # closed without a verdict: not trusted
    run("failed-trained", [2, 4, 6, 8], None, checkpoint=True, error="OSError: No space left on device")
    run("failed-no-weights", [2, 4, 6, 8], None, error="OSError: No space left on device")
    run("failed-cut", [2, 4], None, checkpoint=True, error="RuntimeError: server gone")
    names = (
        "full",
        "stopped",
        "cut",
        "cut-finished",
        "failed-trained",
        "failed-no-weights",
        "failed-cut",
        "never",
    )
    done = {t: s.prepare_rerun(t, "val_psnr_y") for t in names}
    assert {t: r is not None for t, r in done.items()} == {
        "full": True,
        "stopped": True,
        "cut": False,
        "cut-finished": False,
        "failed-trained": True,
        "failed-no-weights": False,
        "failed-cut": False,
        "never": False,
    }
    assert [(done[t]["step"], done[t]["val_psnr_y"]) for t in ("full", "stopped", "failed-trained")] == [
        (8, 28.0),
        (4, 24.0),
        (8, 28.0),
    ]
    for t in ("failed-trained", "failed-no-weights", "failed-cut"):  # each gets a verdict of its rerun
        tags = s._trial_run(t).data.tags
        assert study.TAG_VERDICT not in tags and study.TAG_ERROR not in tags, t
    assert s.close_trial("failed-trained", {**done["failed-trained"]})  # the driver's verdict, again
    assert s._trial_run("failed-trained").data.tags[study.TAG_VERDICT] == study.COMPLETE


def test_the_studys_students_start_from_the_teacher_only_where_every_one_fits(tmp_path):
    import dataclasses

    import torch

    from model import build_model, preset
    from search import stages
    from search.trainable import StudyContext, student_config, trial_model

    s = _study(tmp_path, "init")
    teacher = preset("tiny", embed_dim=12, embed_norm=True, block_residual=False)  # DVMSR's topology
    path = tmp_path / "teacher.pt"
    torch.save(
        {"model_config": dataclasses.asdict(teacher), "model": build_model(teacher).state_dict()}, path
    )
    uri = s.log_artifact(path, "teacher")
    smoke = load_config(load_config.__globals__["CONFIG_DIR"] / "smoke.yaml")  # students C 4..12

    def cfg(init, high=12):
        space = dataclasses.replace(
            smoke.space, embed_dim=dataclasses.replace(smoke.space.embed_dim, high=high)
        )
        return dataclasses.replace(
            smoke, space=space, training=dataclasses.replace(smoke.training, init=init)
        )

    init, why = stages.student_init(cfg("auto"), s, uri)
    assert init == "teacher" and why.startswith("every student of the space fits inside the teacher")
    assert stages.student_init(cfg("teacher"), s, uri)[0] == "teacher"
    assert stages.student_init(cfg("scratch"), s, uri) == ("scratch", "training.init is scratch")
    narrow_teacher = build_model("tiny")  # embed dim 8
    torch.save(
        {"model_config": dataclasses.asdict(narrow_teacher.cfg), "model": narrow_teacher.state_dict()}, path
    )
    narrow = s.log_artifact(path, "teacher8")
    init, why = stages.student_init(cfg("auto"), s, narrow)
    assert init == "scratch" and why == (
        "for the widest student of the space, the student's embed dim is 12, wider than the teacher's 8; "
        "give it at most 8"
    )
    assert stages.student_init(cfg("auto", high=8), s, narrow)[0] == "teacher"
    # the optional knobs count too: a space reaching 3 groups does not fit a 2-group teacher
    deeper = cfg("auto", high=8)
    deeper = dataclasses.replace(deeper, space=dataclasses.replace(deeper.space, n_groups=IntRange(1, 3)))
    init, why = stages.student_init(deeper, s, narrow)
    assert init == "scratch" and why.startswith(
        "for the widest student of the space, the student's number of groups"
    )
    with pytest.raises(ConfigError, match="training.init: teacher, but for the widest student"):
        stages.student_init(cfg("teacher"), s, narrow)
    assert stages.student_init(cfg("auto"), s, None) == (
        "scratch",
        "the study has no teacher (space.alpha allows no distillation)",
    )
    with pytest.raises(ConfigError, match="training.init: teacher, but the study has no teacher"):
        stages.student_init(cfg("teacher"), s, None)
    with pytest.raises(ConfigError, match="training.init: must be one of"):
        load_config(None, {"training.init": "maybe"})

    # a trial of a study whose students inherit: its training starts from the teacher, alpha 0 too
    ctx = StudyContext(cfg("auto").to_dict(), s, uri, init="teacher")
    train_cfg = student_config(ctx, {"embed_dim": 8, "rank": 2, "alpha": 0.0}, 8, 4)
    assert train_cfg.init == "teacher" and train_cfg.teacher.endswith(".pt") and train_cfg.alpha == 0.0
    # in its teacher's topology, as trainers.train puts it: the trial's cost is of what trains
    assert train_cfg.model.embed_norm is True and train_cfg.model.block_residual is False
    assert trial_model(ctx, {"embed_dim": 8, "rank": 2}) == train_cfg.model
    scratch = student_config(replace_init(ctx, "scratch"), {"embed_dim": 8, "alpha": 0.0}, 8, 4)
    assert scratch.teacher is None and scratch.model.embed_norm is False and scratch.model.block_residual


def replace_init(ctx, init):
    import dataclasses

    return dataclasses.replace(ctx, init=init)


def test_trial_labels_carry_the_knobs():
    assert study.trial_label(3, {"embed_dim": 32, "rank": 4, "alpha": 0.6}) == "t03 C32 r4 a0.60"
    assert study.trial_label(12, {"embed_dim": 8, "rank": 1, "alpha": 0.0}, 2) == "R2 t12 C8 r1 a0.00"
    assert study.trial_label(None, {"embed_dim": 8, "rank": 1, "alpha": 0.25}) == "C8 r1 a0.25"


def test_the_study_description_keeps_its_sections_champion_first(tmp_path):
    s = _study(tmp_path, "describe")
    s.describe("Search", "What this study searched.")
    s.describe("Result", "3 trials")
    s.describe("Champion", "v2")
    s.describe("Result", "4 trials")
    assert (
        s.tags()[study.NOTE]
        == "### Champion\nv2\n\n### Result\n4 trials\n\n### Search\nWhat this study searched."
    )


def test_the_installed_ray_and_optuna_are_the_versions_compat_was_written_for():
    """search/compat.py reaches into their internals: an upgrade must revisit it (and pyproject's pins)."""
    from importlib.metadata import version

    for package, minor in compat.TESTED.items():
        assert version(package).startswith(minor + "."), (package, version(package), minor)


def test_selection_says_when_the_champion_is_within_noise_of_the_runner_up():
    """rank() on rows alone: the sentence appears when the cost difference is within the two
    candidates' spreads added, not when it is larger, nor when the agent reported no spread."""
    from dataclasses import replace

    from search.selection import Limits, Row, rank

    def row(version, psnr, mean, std):
        return Row(
            version,
            f"r{version}",
            f"t{version}",
            {"embed_dim": 16, "rank": 2, "alpha": 0.5},
            psnr,
            contract.DONE,
            latency_ms_mean=mean,
            latency_ms_p50=mean,
            latency_ms_std=std,
        )

    close = [row("1", 26.0, 2.0, 0.05), row("2", 27.0, 2.05, 0.05)]
    sel = rank(close, "cpu", Limits(), "knee")
    assert sel.champion.version == "2" and "runner-up v1" in sel.message and "+/-0.1 ms" in sel.message
    # what the champion trades against the runner-up, said whether or not it is within noise
    assert "v2: +1.00 dB for +0.05 ms (mean latency) over the runner-up v1 (t1, C16 r2 a0.50)." in sel.message
    noise = "cannot be told apart by cost"
    assert noise in sel.message
    apart = [replace(close[0], latency_ms_std=0.01), replace(close[1], latency_ms_std=0.01)]
    assert noise not in rank(apart, "cpu", Limits(), "knee").message
    unknown = [replace(close[0], latency_ms_std=None), close[1]]
    assert noise not in rank(unknown, "cpu", Limits(), "knee").message
    # energy: its spread is the coefficient of variation times the figure
    energy = [
        replace(r, energy_mj_per_image=e, energy_cv=0.1, power_mw=3000.0) for r, e in zip(close, (1.0, 1.1))
    ]
    sel = rank(energy, "cpu", Limits(), "best-psnr")
    assert sel.cost == contract.ENERGY and "by -0.1 mJ/image in energy" in sel.message
    assert "+/-0.21 mJ/image" in sel.message
    unstable = [replace(close[0], unstable=True), close[1]]
    assert not unstable[0].measured


def test_selection_names_a_reference_with_more_psnr_at_a_latency_within_noise_of_the_champions():
    """The real study's case: the hand pick had 0.16 dB more than the champion at a mean latency
    3.6 ms higher, within the two spreads (8.4 + 9.6 ms): not dominating, but not worse either."""
    from dataclasses import replace

    from search.selection import Limits, Row, rank

    knobs = {"embed_dim": 32, "rank": 14, "alpha": 0.65}
    champ = Row("1", "r1", "t02", knobs, 30.73, contract.DONE, latency_ms_mean=227.4, latency_ms_std=8.4)
    hand = replace(
        champ, version="7", run_name="hand", knobs={**knobs, "rank": 2}, psnr=30.89, latency_ms_mean=231.0
    )
    hand = replace(hand, latency_ms_std=9.6, reference="hand-pick")
    espcn = replace(
        champ, version="9", psnr=30.33, latency_ms_mean=2.7, latency_ms_std=0.3, reference="espcn"
    )
    sel = rank([champ, hand, espcn], "local-cpu", Limits(), "knee")
    assert sel.champion.version == "1"  # references are never chosen
    assert (
        "The reference hand-pick (v7: val_psnr_y 30.890 dB, latency 231.000 ms mean (SD 9.6 ms across "
        "windows)) has +0.160 dB over the champion at a mean latency within the measurement noise of the "
        "champion's (+3.6 ms, +/-18)" in sel.message
    )
    assert "espcn" not in sel.message  # faster, but less PSNR: it does not beat the champion
    slower = replace(hand, latency_ms_mean=260.0)  # beyond the noise: no sentence
    assert "hand-pick" not in rank([champ, slower], "local-cpu", Limits(), "knee").message
    faster = replace(hand, latency_ms_mean=220.0)  # dominates: the stronger sentence
    message = rank([champ, faster], "local-cpu", Limits(), "knee").message
    assert "hand-pick" in message and "dominates the champion" in message and "within the" not in message


def test_a_finalization_takes_its_trials_last_checkpoint_or_starts_again_without_one(tmp_path, capsys):
    from types import SimpleNamespace

    from search.trainable import _trial_weights
    from trainers.checkpoint import save_checkpoint

    handle = _study(tmp_path)
    c = mlflow_util.client(handle.tracking_uri)
    with_ckpt, without = (c.create_run(handle.experiment_id).info.run_id for _ in range(2))
    ckpt = tmp_path / "trial" / "last.pt"
    ckpt.parent.mkdir()
    save_checkpoint({"model_config": {}, "model": {}, "step": 150}, ckpt)
    c.log_artifact(with_ckpt, str(ckpt), study.CHECKPOINT_DIR)
    ctx = SimpleNamespace(tracking_uri=handle.tracking_uri)
    local, step = _trial_weights(ctx, with_ckpt, tmp_path / "final")
    assert (local, step) == (str(tmp_path / "final" / "trial.pt"), 150)
    assert Path(local).read_bytes() == ckpt.read_bytes() and not list((tmp_path / "final").glob("*.partial"))
    ckpt.unlink()  # a resumed finalization names its own copy, not the download
    assert _trial_weights(ctx, with_ckpt, tmp_path / "final") == (local, 150)
    assert _trial_weights(ctx, without, tmp_path / "other") == ("", None)
    assert "no trial checkpoint" in capsys.readouterr().out and not (tmp_path / "other").exists()


def test_the_local_agent_runs_only_while_a_round_waits_for_its_measurements(tmp_path, monkeypatch):
    """It measures on the CPU the trials use: started for the wait, stopped when the wait ends,
    also when the wait fails, so no trial's load lands in its windows."""
    from search import loop

    events = []

    class FakeAgent:
        def __init__(self, tracking_uri, cfg, state_dir):
            events.append(("start", str(state_dir)))

        def stop(self):
            events.append(("stop",))

    def wait(tracking_uri, model_name, versions, device, timeout_s, agent=None):
        events.append(("wait", tuple(versions), device, agent is not None))
        if versions == ["9"]:
            raise RuntimeError("the tracking server went away")
        return {v: contract.DONE for v in versions}

    monkeypatch.setattr(loop, "LocalAgent", FakeAgent)
    monkeypatch.setattr(loop, "wait_for_measurements", wait)
    # the smoke config: loop.local_agent true, device local-cpu
    cfg = load_config(Path(__file__).parents[1] / "search" / "configs" / "smoke.yaml")
    assert loop.measure("sqlite:///x.db", cfg, ["1", "2"], tmp_path / "agent") == {"1": "done", "2": "done"}
    assert events == [("start", str(tmp_path / "agent")), ("wait", ("1", "2"), "local-cpu", True), ("stop",)]
    events.clear()
    with pytest.raises(RuntimeError):
        loop.measure("sqlite:///x.db", cfg, ["9"], tmp_path / "agent")
    assert events[-1] == ("stop",)
    events.clear()
    remote = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, local_agent=False, agent_args=()))
    loop.measure("sqlite:///x.db", remote, ["3"], tmp_path / "agent")
    assert events == [("wait", ("3",), "local-cpu", False)]  # an agent elsewhere measures: none started here


def test_a_round_waits_for_every_version_not_measured_yet(tmp_path):
    """Registered before a kill that came before its measurement: a resumed round waits for it too."""
    from mlflow.tracking import MlflowClient

    from search import loop

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    c.create_registered_model("m")
    for _ in range(4):
        c.create_model_version("m", source=str(tmp_path))
    c.set_model_version_tag("m", "1", contract.status_tag("cpu"), contract.DONE)
    c.set_model_version_tag("m", "2", contract.status_tag("cpu"), contract.FAILED)
    c.set_model_version_tag("m", "3", contract.status_tag("cpu"), contract.MEASURING)
    c.set_model_version_tag("m", "4", contract.status_tag("other"), contract.DONE)  # another device's
    assert loop.unmeasured(uri, "m", ["1", "2", "3", "4"], "cpu") == ["3", "4"]
    assert loop.unmeasured(uri, "m", [], None) == []


def test_selection_and_the_search_config_start_without_torch(tmp_path):
    """``mambalitesr-select`` only reads MLflow: its command line, a selection that fails on an
    unknown experiment, and the search's config (with the model presets) load neither torch nor ray."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import model.config, search.config, search.selection\n"
        "search.config.load_config(None)\n"
        f"rc = search.selection.main(['--experiment', 'none', '--tracking-uri', 'sqlite:///{tmp_path}/m.db'])\n"
        "bad = sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'ray'})\n"
        "print(rc, bad)\n"
        "sys.exit(0 if rc != 0 and not bad else 1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def _state_copy_race_logs(tmp_path: Path) -> list[str]:
    """What Ray logs when its background copy of Tune's state folder lists a temporary file that
    Tune's atomic save renames before the copy opens it: the race itself, made on purpose with
    Ray's own syncer and save function, then reported the two ways Ray 2.60 does (the syncer when
    it starts the next copy, Tune's experiment state when it waits for one)."""
    import logging
    import threading
    import time

    import pyarrow.fs
    from ray.train._internal.storage import _FilesystemSyncer
    from ray.tune.utils.util import _atomic_save

    src = tmp_path / "driver_artifacts"
    src.mkdir(parents=True)
    for i in range(50):
        (src / f"f{i}.json").write_text("x" * 1000)
    records, done = [], threading.Event()

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    def save_again_and_again():
        while not done.is_set():
            _atomic_save({"x": b"0" * 200_000}, str(src), "searcher-state.pkl", "tmp-searcher-state.pkl")

    loggers = [logging.getLogger(name) for name in compat.STATE_COPY_LOGGERS]
    handler = Keep(logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    for logger in loggers:
        logger.addHandler(handler)
    threading.Thread(target=save_again_and_again, daemon=True).start()
    syncer = _FilesystemSyncer(pyarrow.fs.LocalFileSystem(), sync_period=0)
    deadline = time.monotonic() + 60
    try:
        while not records and time.monotonic() < deadline:
            syncer.sync_up(str(src), str(tmp_path / "storage"))  # logs when the copy before it failed
            time.sleep(0.001)
        while time.monotonic() < deadline:
            syncer.sync_up(str(src), str(tmp_path / "storage"))
            try:
                syncer.wait()
            except Exception:  # as ray/tune/execution/experiment_state.py reports it
                loggers[1].error("Saving experiment state to storage failed with exception: ", exc_info=True)
                break
    finally:
        done.set()
        for logger in loggers:
            logger.removeHandler(handler)
    return records


def test_ray_s_state_copy_race_is_one_line_not_a_traceback(tmp_path):
    """Unquieted, the race gives two tracebacks naming the vanished temporary file; after
    quiet_state_copy_race the same race gives one INFO line each, and a record about any other
    missing file still carries its traceback."""
    import logging

    for name in compat.STATE_COPY_LOGGERS:  # as Ray leaves them, whatever ran before in this process
        logging.getLogger(name).filters.clear()
    loud = _state_copy_race_logs(tmp_path / "loud")
    assert len(loud) == 2, loud
    assert all("Traceback" in r and "FileNotFoundError" in r and "-tmp-searcher" in r for r in loud), loud

    compat.quiet_state_copy_race()
    compat.quiet_state_copy_race()  # idempotent: one filter per logger
    assert all(len(logging.getLogger(name).filters) == 1 for name in compat.STATE_COPY_LOGGERS)
    quiet = _state_copy_race_logs(tmp_path / "quiet")
    assert quiet == [f"INFO {compat.STATE_COPY_RACE}"] * 2, quiet

    records = []
    logger = logging.getLogger(compat.STATE_COPY_LOGGERS[1])
    handler = logging.Handler()
    handler.emit = lambda record: records.append(logging.Formatter().format(record))
    logger.addHandler(handler)
    try:
        try:
            open(tmp_path / "experiment_state.json")
        except FileNotFoundError:
            logger.error("Saving experiment state to storage failed with exception: ", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and "Traceback" in records[0] and "experiment_state.json" in records[0]


def test_a_knob_added_to_the_table_reaches_every_place(monkeypatch):
    """One row in search.config.KNOBS (and its range in SpaceConfig) is all a new knob needs: the
    space draws it, the trial's network, typed params, name, description, Tune's columns, the
    teacher-fit check and both tables carry it. d_state stands in for a new network knob."""
    import optuna

    from search import config, report, selection, space, stages
    from search.config import IntRange, Knob, SpaceConfig

    # the table and the config's ranges name the same knobs, in the same order
    assert [f.name for f in dataclasses.fields(SpaceConfig)] == list(config.knob_names())
    new = Knob("d_state", "s", "state", int, "d", network=True, always=False)
    monkeypatch.setattr(config, "KNOBS", (*config.KNOBS, new))
    Space = dataclasses.make_dataclass(
        "Space", [("d_state", IntRange | None, None)], bases=(SpaceConfig,), frozen=True
    )
    smoke = load_config(load_config.__globals__["CONFIG_DIR"] / "smoke.yaml")
    fields = {f.name: getattr(smoke.space, f.name) for f in dataclasses.fields(SpaceConfig)}
    cfg = dataclasses.replace(smoke, space=Space(**fields, d_state=IntRange(3, 3)))

    trial = optuna.create_study().ask()
    space.define_space(trial, cfg)
    assert trial.params["d_state"] == 3  # drawn
    params = {k: str(v) for k, v in trial.params.items()}  # as MLflow keeps them
    assert space.model_config(params, cfg).d_state == 3  # the network it trains
    assert config.knobs_of(params)["d_state"] == 3 and config.knob_params(params)["d_state"] == "3"  # logged
    # the runs table's params: floats to 4 significant digits (the trial's config keeps them all)
    assert config.knob_params({"alpha": 0.6027633760716439, "rank": 4}) == {"alpha": "0.6028", "rank": "4"}
    assert study.trial_label(1, params).endswith(" s3")  # its name
    assert "d_state s in [3, 3]" in study.describe_study(cfg)  # the study's description
    assert "d_state" in [k.name for k, _ in cfg.space.ranges()]  # Tune's progress columns
    assert stages.widest_student(cfg).d_state == 3  # what the teacher must hold

    knobs = config.knobs_of(params)
    row = study.TrialRow("t", "r", study.COMPLETE, 8, 25.0, 1.0, knobs=knobs)
    assert " s3 " in report.format_table([row], "flops_g") + " "  # the search's table
    assert report.plot_rows([row])[0]["label"].endswith(" s3")  # the plot's label
    candidate = selection.Row("1", "r", "", knobs, 25.0, contract.DONE)
    assert candidate.label.endswith(" s3")
    head, _, line = [
        [c.strip() for c in x.split("|")] for x in selection.table([candidate], True).splitlines()
    ]
    assert head[2:8] == ["version", "run", "C", "r", "alpha", "state"] and line[7] == "3"  # its table


def test_a_round_costs_its_rows_by_one_rule_and_changes_none():
    """Measured, else predicted, else FLOPs; the front and the costs are new rows, the rows read
    from MLflow stay as they were (they are frozen)."""
    from search import loop, report
    from search.study import COMPLETE, TrialRow

    cfg = load_config(load_config.__globals__["CONFIG_DIR"] / "smoke.yaml")
    knobs = {"embed_dim": 8, "rank": 2, "alpha": 0.5}
    rows = [TrialRow(t, f"r{t}", COMPLETE, 8, 25.0, math.nan, knobs=knobs) for t in ("a", "b")]

    class Model:
        def predict(self, arch):
            return 7.0 + arch.embed_dim

    out = loop.costed(rows, cfg, loop.CostRule({"ra": 3.0}, Model(), 1))
    assert [(r.cost, r.cost_source) for r in out] == [(3.0, "measured"), (15.0, "predicted")]
    flops = loop.costed(rows, cfg, loop.CostRule({}, None, 0))
    assert {r.cost_source for r in flops} == {"flops"} and flops[0].cost > 0
    assert loop.costed(rows, cfg, None) == rows  # a computed cost (flops_g): the rows as read
    front = report.with_front(out)
    assert [r.on_front for r in front] == [True, False]  # same PSNR, more cost: dominated
    assert all(math.isnan(r.cost) and not r.on_front for r in rows)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].cost = 1.0
