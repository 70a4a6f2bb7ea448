"""The search machinery on any objective: the rank rule, geometric rungs, NSGA-II under early
stopping, and trials whose last result lacks an objective (Optuna FAIL, verdict failed)."""

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from edge_agent import contract
from search import compat, engine, mlflow_util, study
from search.scheduler import ParetoRungScheduler, RungPoint, is_rung, rank_order
from search.searcher import StoppingAwareNSGAIISampler, make_sampler, optuna_searcher


class FakeTrial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_geometric_rungs_and_every_validation():
    assert [i for i in range(1, 53) if is_rung(i, 1, 3)] == [1, 3, 9, 27]
    assert [i for i in range(1, 40) if is_rung(i, 2, 2)] == [2, 4, 8, 16, 32]
    assert [i for i in range(1, 7) if is_rung(i, 2, 1)] == [2, 3, 4, 5, 6]


def test_rank_order_takes_fronts_in_turn_and_spreads_each_by_an_epsilon_net():
    a, b, c = RungPoint("a", 90, 10), RungPoint("b", 80, 1), RungPoint("c", 85, 5)  # first front
    d = RungPoint("d", 84.5, 5.5)  # dominated by c only: second front
    e = RungPoint("e", 70, 20)  # dominated by all
    order = rank_order([e, d, c, b, a])
    # front 1 starts at the best quality (a); the farthest from a is b, then c; then d, then e
    assert [p.trial_id for p in order] == ["a", "b", "c", "d", "e"]


def test_rank_rule_lets_only_the_best_third_continue():
    s = ParetoRungScheduler("q", "c", "epoch", min_rung=1, rule="rank", eta=3)
    r = lambda q, c: {"q": q, "c": c, "epoch": 1}  # noqa: E731
    assert s.on_trial_result(None, FakeTrial("a"), r(90, 10)) == "CONTINUE"  # alone: kept
    assert s.on_trial_result(None, FakeTrial("b"), r(50, 20)) == "STOP"  # 2nd of 2: ceil(2/3) = 1
    assert s.on_trial_result(None, FakeTrial("c"), r(95, 30)) == "CONTINUE"  # on the front with a
    assert "ranked 2 of 2" in s.reason("b")
    assert "(50.00 at cost 20)" in s.reason("b") and "dB" not in s.reason("b")  # no unit given: none said
    with pytest.raises(ValueError, match="rule must be one of"):
        ParetoRungScheduler("q", "c", rule="median")


def test_dominated_rule_on_geometric_rungs_judges_only_there():
    s = ParetoRungScheduler("q", "c", "epoch", min_rung=1, rung_factor=3)
    for epoch in (1, 2):
        s.on_trial_result(None, FakeTrial("good"), {"q": 90, "c": 1, "epoch": epoch})
    assert s.on_trial_result(None, FakeTrial("bad"), {"q": 10, "c": 2, "epoch": 1}) == "STOP"
    s2 = ParetoRungScheduler("q", "c", "epoch", min_rung=2, rung_factor=3)  # rungs 2, 6, 18
    s2.on_trial_result(None, FakeTrial("good"), {"q": 90, "c": 1, "epoch": 1})
    assert s2.on_trial_result(None, FakeTrial("bad"), {"q": 10, "c": 2, "epoch": 1}) == "CONTINUE"


def test_make_scheduler_names():
    goal = engine.Objectives("q", "c", "epoch", 52)
    assert engine.make_scheduler("none", goal) is None
    moasha = engine.make_scheduler("moasha", goal)
    assert (moasha.rule, moasha.eta, moasha.rung_factor) == ("rank", 3.0, 3.0)
    assert engine.make_scheduler("pareto", goal).rule == engine.StoppingRule().rule
    assert type(engine.make_scheduler("asha", goal)).__name__ == "AsyncHyperBandScheduler"
    with pytest.raises(ValueError, match="scheduler must be one of"):
        engine.make_scheduler("hyperband", goal)


def _nsga_run(sampler, n=40, keep_every=4):
    """n trials on a toy problem where only every ``keep_every``-th completes, the rest pruned
    (as under early stopping); returns the largest generation reached."""
    s = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for i in range(n):
        t = s.ask()
        x, y = t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)
        if i % keep_every == 0:
            s.tell(t, [x, y])
        else:
            s.tell(t, state=TrialState.PRUNED)
    key = sampler._get_generation_key()
    return max(t.system_attrs.get(key, 0) for t in s.trials)


def test_nsga2_generations_advance_under_early_stopping():
    # Optuna's NSGA-II needs 4 COMPLETE per generation: 10 of 40 trials is 2 generations, and with
    # stopping most trials are the random first generation; ours counts every finished trial
    stock = _nsga_run(optuna.samplers.NSGAIISampler(seed=0, population_size=4))
    ours = _nsga_run(StoppingAwareNSGAIISampler(seed=0, population_size=4))
    assert ours >= 8 > stock
    assert isinstance(make_sampler("nsga2", 0, 4), StoppingAwareNSGAIISampler)


def _searcher(budget=4):
    def space(trial):
        trial.suggest_float("x", 0, 1)

    return optuna_searcher(space, ("q", "c"), "step", budget, make_sampler("random", 0, 2))


@pytest.mark.parametrize("last", [{"step": 4, "q": 1.0}, {"step": 4, "q": 1.0, "c": float("nan")}])
def test_a_missing_objective_is_told_to_optuna_as_fail_not_left_running(last):
    searcher = _searcher()
    for trial_id in ("t1", "t2", "t3"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_complete("t1", last)  # a failed energy read: the cost is absent or NaN
    searcher.on_trial_complete("t2", {"step": 4, "q": 1.0, "c": 2.0})
    searcher.on_trial_complete("t3", {"step": 2, "q": 1.0, "c": 2.0})  # stopped at step 2
    states = [t.state for t in compat.optuna_study(searcher).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED]


def test_a_missing_objective_is_recorded_as_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = study.ensure_experiment(uri, "m")
    parent = mlflow_util.client(uri).create_run(exp_id, tags={contract.ROLE: contract.ROLE_STUDY}).info.run_id
    s = study.Study(uri, exp_id, parent, "m", iterations=4)
    params = {"embed_dim": 16, "rank": 2, "alpha": 0.5}
    s.open_trial("x1", params)
    s.open_trial("x2", params)
    assert s.close_trial(
        "x1", {"step": 4, "val_psnr_y": 20.0}, params=params, objectives=("val_psnr_y", "flops_g")
    )
    assert s.close_trial(
        "x2",
        {"step": 4, "val_psnr_y": 20.0, "flops_g": 0.1},
        params=params,
        objectives=("val_psnr_y", "flops_g"),
    )
    runs = {
        r.data.tags[study.TAG_TRIAL_ID]: r
        for r in mlflow_util.all_pages(mlflow_util.client(uri).search_runs, [exp_id])
        if study.TAG_TRIAL_ID in r.data.tags
    }
    assert runs["x1"].data.tags[study.TAG_VERDICT] == "failed" and runs["x1"].info.status == "FAILED"
    assert "no finite flops_g" in runs["x1"].data.tags[study.TAG_ERROR]
    assert runs["x2"].data.tags[study.TAG_VERDICT] == "complete"


def _x_space(trial):
    trial.suggest_float("x", 0.0, 1.0)


def _toy_trial(config):
    """Two rungs of a toy objective; the cost read fails (is absent) at the end when x > 0.5."""
    for step in (1, 2):
        result = {"step": step, "q": config["x"], "c": 1.0 - config["x"] / 2}
        if step == 2 and config["x"] > 0.5:
            del result["c"]  # e.g. the energy reading failed
        compat.report(result)


@pytest.mark.ray
@pytest.mark.e2e
def test_through_ray_tune_a_trial_without_its_cost_ends_failed_in_optuna_and_in_mlflow(tmp_path, monkeypatch):
    """The seam as Tune drives it: Ray's own OptunaSearch would leave such an Optuna trial
    RUNNING; ours tells FAIL, and the verdict callback writes "failed" with the reason."""
    import ray
    from ray import tune

    from search.callbacks import VerdictCallback

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = study.ensure_experiment(uri, "seam")
    parent = mlflow_util.client(uri).create_run(exp_id, tags={contract.ROLE: contract.ROLE_STUDY}).info.run_id
    s = study.Study(uri, exp_id, parent, "seam", iterations=2)
    goal = engine.Objectives("q", "c", "step", budget=2)
    searcher = engine.make_searcher("random", _x_space, goal, seed=1)
    here = str(Path(__file__).parent)  # the workers import _toy_trial from this module
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": here}},
    )
    try:
        results = engine.tune_run(
            tune.with_resources(_toy_trial, {"cpu": 1}),
            searcher,
            None,
            8,
            "seam",
            str(tmp_path / "ray"),
            callbacks=[VerdictCallback(s, 1, None, ("q", "c"))],
            verbose=0,
        )
    finally:
        ray.shutdown()
    xs = {r.metrics["trial_id"]: r.config["x"] for r in results}
    assert any(x > 0.5 for x in xs.values()) and any(x <= 0.5 for x in xs.values())
    optuna_states = {t.params["x"]: t.state for t in compat.optuna_study(searcher).trials}
    assert optuna_states == {x: TrialState.FAIL if x > 0.5 else TrialState.COMPLETE for x in xs.values()}
    runs = mlflow_util.all_pages(
        mlflow_util.client(uri).search_runs, [exp_id], filter_string=f"tags.`{study.TAG_VERDICT}` != ''"
    )
    verdicts = {r.data.tags[study.TAG_TRIAL_ID]: r.data.tags[study.TAG_VERDICT] for r in runs}
    assert verdicts == {t: "failed" if x > 0.5 else "complete" for t, x in xs.items()}
