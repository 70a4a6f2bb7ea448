"""The LCBench benchmark: the surrogate read as yahpo-gym reads it, the analysis, and one small
study per scheduler through Ray Tune (the plumbing CI runs)."""

import json
import os

import pytest

from benchmarks import bench_lcbench as bench
from benchmarks import lcbench
from tests.conftest import SHARED

DATA = SHARED / "bench" / "yahpo-lcbench"

# Recorded from yahpo-gym 1.0.2, BenchmarkSet("lcbench", instance=task).objective_function(config)
# with its data path at a folder whose lcbench/ is ../shared/bench/yahpo-lcbench (the instance
# overrides the config's task, so one BenchmarkSet per task): (task, epoch, config) -> (time, acc)
# values in the order of lcbench.CONT[1:]: batch_size, learning_rate, momentum, weight_decay,
# num_layers, max_units, max_dropout
YAHPO = [  # fmt: skip
    ("3945", 52, (91, 0.0031622777, 0.545, 0.050005, 3, 256, 0.5), (165.6897430419922, 93.39881134033203)),
    ("7593", 7, (300, 0.05, 0.9, 0.001, 1, 900, 0.1), (148.19192504882812, 57.23670959472656)),
    ("126026", 30, (20, 0.0002, 0.2, 0.09, 5, 70, 0.9), (122.18365478515625, 74.09622955322266)),
]


@pytest.fixture(scope="module")
def folder():
    return str(lcbench.data_dir(DATA))


@pytest.mark.parametrize("task,epoch,config,expected", YAHPO)
def test_the_surrogate_answers_as_yahpo_gym_does(folder, task, epoch, config, expected):
    config = dict(zip(lcbench.CONT[1:], config))
    out = lcbench.surrogate(folder).predict(task, [config], [epoch])[0, 0]
    got = (out[lcbench.OUTPUTS.index("time")], out[lcbench.OUTPUTS.index("val_accuracy")])
    assert got == pytest.approx(expected, rel=1e-5)


def test_a_curve_has_every_epoch_and_an_unknown_task_is_refused(folder):
    s = lcbench.surrogate(folder)
    config = s.random_configs(1, seed=3)[0]
    curve = s.curve("3945", config)
    assert [r["epoch"] for r in curve] == list(range(1, 53))
    assert curve[-1]["time"] > curve[0]["time"] > 0  # time grows with epochs
    with pytest.raises(ValueError, match="not one of LCBench's"):
        s.predict("999", [config], [1])


def test_a_missing_surrogate_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(lcbench.SurrogateMissing, match="missing model.onnx"):
        lcbench.data_dir(tmp_path)
    assert bench.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "LCBENCH_DATA" in capsys.readouterr().err


def _run(seed, trials, scheduler="pareto"):
    """A run as bench.run_one writes it: (epochs, accuracy, time, end clock) per trial."""
    return {
        "task": "1",
        "scheduler": scheduler,
        "searcher": "random",
        "seed": seed,
        "trials": [{"epochs": e, "val_accuracy": q, "time": c, "end": t} for e, q, c, t in trials],
    }


def test_the_curve_counts_epochs_in_end_order_and_only_fully_trained_points():
    run = _run(0, [(52, 90.0, 50.0, 3.0), (10, 99.0, 5.0, 1.0), (52, 80.0, 10.0, 2.0)])
    points = bench.curve(run, (50.0, 100.0))
    box = 50.0 * 100.0
    # ended: the stopped one (10 epochs, no point), then (80, 10), then (90, 50)
    assert [e for e, _ in points] == [10, 62, 114]
    assert points[0][1] == 0.0
    assert points[1][1] == pytest.approx(30 * 90 / box)
    assert points[2][1] == pytest.approx((30 * 40 + 40 * 50) / box)
    assert bench.hv_at(points, 61) == 0.0 and bench.hv_at(points, 62) == points[1][1]


def test_equal_compute_compares_at_the_cheaper_runs_epochs():
    a = {0: {"curve": [(10, 0.1), (20, 0.5)]}, 1: {"curve": [(10, 0.2), (30, 0.6)]}}
    b = {0: {"curve": [(15, 0.3), (100, 0.9)]}, 1: {"curve": [(5, 0.1), (25, 0.4)]}}
    c = bench.equal_compute(a, b)
    # seed 0 at 20 epochs: 0.5 - 0.3; seed 1 at 25: 0.2 - 0.4
    assert c["diff_mean"] == pytest.approx((0.2 - 0.2) / 2) and c["n"] == 2
    assert c["epochs_mean"] == pytest.approx(22.5)


def test_pareto_options_are_checked():
    assert bench.parse_rule(["min_rung=2", "margin=0.5"]).min_rung == 2
    assert bench.scheduler_label("pareto", bench.parse_rule(["min_rung=3"])) == "pareto[min_rung=3]"
    assert bench.scheduler_label("pareto", bench.parse_rule([])) == "pareto"
    for bad in (["minrung=2"], ["margin=x"], ["rule=median"]):
        with pytest.raises(SystemExit):
            bench.parse_rule(bad)


@pytest.mark.ray
@pytest.mark.e2e
def test_the_benchmark_runs_every_scheduler_through_ray_tune(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "out"
    args = [
        "--data",
        folder,
        "--tasks",
        "3945",
        "--seeds",
        "1",
        "--trials",
        "6",
        "--out",
        str(out),
        "--schedulers",
        "none,pareto,moasha,asha,syne-moasha",
        "--searchers",
        "random",
        "--max-concurrent",
        "2",
        "--baseline-searcher",
        "random",
    ]
    assert bench.main(args) == 0
    # the benchmark's Tune setting does not leak into later runs of this process (result files)
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"3945"}
    assert set(summary["3945"]) == {
        f"{s}/{r}" for s in ("none", "pareto", "moasha", "asha", "syne-moasha") for r in ("random",)
    }
    for v in summary["3945"].values():
        assert set(v) == {"hv_mean", "hv_se", "epochs_mean", "epochs_se", "n"} and v["n"] == 1
        assert 0.0 <= v["hv_mean"] <= 1.0
    assert summary["3945"]["none/random"]["epochs_mean"] == 6 * 52  # no stopping: every epoch
    for path in (out / "runs" / "3945").glob("*.json"):
        run = json.loads(path.read_text())
        assert "RUNNING" not in run["optuna_states"] and sum(run["optuna_states"].values()) == 6
        complete = sum(t["epochs"] == 52 for t in run["trials"])
        assert run["optuna_states"].get("COMPLETE", 0) == complete
    assert (out / "hv_vs_epochs.png").stat().st_size > 10_000
    comparisons = json.loads((out / "comparisons.json").read_text())
    assert set(comparisons["tasks"]["3945"]["vs_none"]) == {"pareto", "moasha", "asha", "syne-moasha"}
    # a second call finds every run on disk and runs nothing
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").rglob("*.json")}
    assert bench.main(args) == 0
    assert mtimes == {p: p.stat().st_mtime for p in (out / "runs").rglob("*.json")}


def test_syne_tunes_moasha_decides_for_tune():
    """Its first result at a rung continues; a worse-on-both second one is stopped (ceil(2/3) = 1
    kept), one on the front beside the first continues; the budget is never a stop."""
    from types import SimpleNamespace

    from benchmarks.syne_moasha import SyneTuneMOASHA

    s = SyneTuneMOASHA(bench.GOAL, seed=0)
    trials = [SimpleNamespace(trial_id=f"t{i}", config={}) for i in range(3)]
    for t in trials:
        s.on_trial_add(None, t)
    r = lambda q, c, e=1: {"epoch": e, "val_accuracy": q, "time": c}  # noqa: E731
    assert s.on_trial_result(None, trials[0], r(90, 10)) == "CONTINUE"
    assert s.on_trial_result(None, trials[1], r(80, 20)) == "STOP"
    assert s.on_trial_result(None, trials[2], r(95, 30)) == "CONTINUE"  # best quality: first of its front
    assert s.on_trial_result(None, trials[0], r(90, 10, e=52)) == "CONTINUE"
