"""Search pieces without Ray running: config, space, early-stopping rule, Pareto front, searcher."""

import math

import optuna
import pytest

from edge_agent import contract
from search import compat, study
from search.config import ConfigError, load_config
from search.pareto import dominates, hypervolume_2d, pareto_front
from search.scheduler import ParetoRungScheduler, RungPoint, dominated_at_rung
from search.searcher import BudgetAwareOptunaSearch, fully_trained, make_searcher
from search.space import define_space, model_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_default_and_smoke_configs_load():
    cfg = load_config()
    assert cfg.searcher == "tpe" and cfg.space.alpha.high == 1.0 and cfg.cost == "flops_g"
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
    s = ParetoRungScheduler("q", "c", "step", min_rung=2)
    r = lambda q, c, step: {"q": q, "c": c, "step": step}  # noqa: E731
    assert s.on_trial_result(None, FakeTrial("a"), r(27.0, 1.0, 10)) == "CONTINUE"
    assert s.on_trial_result(None, FakeTrial("b"), r(20.0, 2.0, 10)) == "CONTINUE"  # rung 1 < min_rung
    assert s.on_trial_result(None, FakeTrial("a"), r(28.0, 1.0, 20)) == "CONTINUE"
    assert s.on_trial_result(None, FakeTrial("c"), r(22.0, 0.5, 10)) == "CONTINUE"
    assert s.on_trial_result(None, FakeTrial("b"), r(21.0, 2.0, 20)) == "STOP"
    assert s.on_trial_result(None, FakeTrial("c"), r(22.5, 0.5, 20)) == "CONTINUE"  # cheapest
    assert s.stopped == [("b", 20)]


def test_searcher_counts_only_fully_trained_trials(tmp_path):
    cfg = load_config(load_config.__globals__["CONFIG_DIR"] / "smoke.yaml")
    searcher = make_searcher(cfg, "unit", tmp_path)
    assert isinstance(searcher, BudgetAwareOptunaSearch)
    searcher.set_search_properties(None, None, {})
    for tid in ("full", "stopped", "crashed", "never"):
        assert searcher.suggest(tid)["embed_dim"] in (4, 8, 12)
    iters = cfg.training.iterations
    searcher.on_trial_complete(
        "full", {"val_psnr_y": 20.0, "flops_g": 0.1, "step": iters, "iterations": iters}
    )
    searcher.on_trial_complete(
        "stopped", {"val_psnr_y": 25.0, "flops_g": 0.05, "step": 4, "iterations": iters}
    )
    searcher.on_trial_complete(
        "crashed", {"val_psnr_y": 26.0, "flops_g": 0.05, "step": 4, "iterations": iters}, error=True
    )
    states = {t.number: t.state for t in compat.optuna_study(searcher).trials}
    assert sorted(s.name for s in states.values()) == ["COMPLETE", "FAIL", "PRUNED", "RUNNING"]
    (complete,) = [t for t in compat.optuna_study(searcher).trials if t.state.name == "COMPLETE"]
    assert complete.values == [20.0, 0.1]
    assert fully_trained({"step": 8, "iterations": 8}) and not fully_trained({"step": 4, "iterations": 8})
    assert (tmp_path / "optuna.db").exists() and not math.isnan(complete.values[0])


def test_collect_settles_trial_runs_to_what_tune_saw(tmp_path):
    """A run left KILLED (driver killed before the callback, then --resume) or closed FAILED by a late
    worker ends as Tune saw its trial end; an early-stopped trial is tagged so."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from search.run import collect

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config()
    exp_id = study.ensure_experiment(uri, "settle")
    c = MlflowClient(uri)
    parent = c.create_run(exp_id, tags={contract.ROLE: contract.ROLE_STUDY}).info.run_id

    def trial(trial_id: str, left: str, step: int, error=None):
        tags = {contract.ROLE: contract.ROLE_TRIAL, study.PARENT: parent, study.TAG_TRIAL_ID: trial_id}
        run_id = c.create_run(exp_id, tags=tags).info.run_id
        c.set_terminated(run_id, status=left)
        metrics = {"trial_id": trial_id, "step": step, "iterations": 8, "val_psnr_y": 25.0, cfg.cost: 1.0}
        result = SimpleNamespace(metrics=metrics, path=None, error=error, config={"embed_dim": 16, "rank": 2})
        return run_id, result

    killed, r1 = trial("t1", "KILLED", 8)
    late, r2 = trial("t2", "FAILED", 4)  # early-stopped, then closed FAILED by its worker
    crashed, r3 = trial("t3", "RUNNING", 2, error=RuntimeError("boom"))
    rows = collect([r1, r2, r3], cfg, uri, exp_id, parent)

    assert [r.status for r in rows] == ["complete", "stopped", "failed"]
    runs = {rid: c.get_run(rid) for rid in (killed, late, crashed)}
    assert [runs[rid].info.status for rid in (killed, late, crashed)] == ["FINISHED", "FINISHED", "FAILED"]
    assert runs[killed].data.tags[study.TAG_EARLY_STOPPED] == "false"
    assert runs[late].data.tags[study.TAG_EARLY_STOPPED] == "true"


def test_a_trial_done_before_a_crash_is_reported_not_retrained(tmp_path, monkeypatch):
    """After --resume, Ray may rerun a trial MLflow already has: fully trained or stopped early, its
    recorded result is reported again; a run cut off mid-training is trained again."""
    from mlflow.tracking import MlflowClient

    from search import trainable

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = study.ensure_experiment(uri, "rerun")
    c = MlflowClient(uri)
    parent = c.create_run(exp_id, tags={contract.ROLE: contract.ROLE_STUDY}).info.run_id
    ctx = trainable.StudyContext({}, uri, exp_id, parent, None)
    reported = []
    monkeypatch.setattr(compat, "report", reported.append)

    def run(trial_id: str, steps: list[int], status: str, early_stopped: str | None = None) -> None:
        tags = {study.PARENT: parent, study.TAG_TRIAL_ID: trial_id}
        if early_stopped:
            tags[study.TAG_EARLY_STOPPED] = early_stopped
        run_id = c.create_run(exp_id, tags=tags).info.run_id
        for s in steps:
            c.log_metric(run_id, "val_psnr_y", 20.0 + s, step=s)
        c.set_terminated(run_id, status=status)

    run("full", [2, 4, 6, 8], "FINISHED", "false")
    run("stopped", [2, 4], "FINISHED", "true")
    run("cut", [2, 4], "KILLED")
    run("cut-finished", [2, 4], "FINISHED")  # closed without the early-stop verdict: not trusted
    done = {
        t: trainable._report_if_already_trained(ctx, t, {"iterations": 8.0})
        for t in ("full", "stopped", "cut", "cut-finished", "never-started")
    }
    assert done == {
        "full": True,
        "stopped": True,
        "cut": False,
        "cut-finished": False,
        "never-started": False,
    }
    assert [(r["step"], r["val_psnr_y"]) for r in reported] == [(8, 28.0), (4, 24.0)]


def test_study_state_is_replaced_atomically(tmp_path, monkeypatch):
    # --resume reads study.json: a crash or a full disk mid-write must leave the previous state
    import json
    import os

    import search.run as run

    run._write_state(tmp_path, "s1", {"rounds_done": 1})

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        run._write_state(tmp_path, "s1", {"rounds_done": 2})
    assert json.loads((tmp_path / "s1" / "study.json").read_text()) == {"rounds_done": 1}
    assert not [p for p in (tmp_path / "s1").iterdir() if p.name != "study.json"]


def test_the_installed_ray_and_optuna_are_the_versions_compat_was_written_for():
    """search/compat.py reaches into their internals: an upgrade must revisit it (and pyproject's pins)."""
    from importlib.metadata import version

    for package, minor in compat.TESTED.items():
        assert version(package).startswith(minor + "."), (package, version(package), minor)
