"""Champion selection against a real MLflow server: front, knee, limits, alias, report, CLI.

Studies are built the way the search leaves them (a ``role=study`` run, child trial runs with
``val_psnr_y`` and the knobs as params, one registered version per candidate) and measured through
the edge agent's own reporting code (``Registry.deliver`` of a ``Report``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent import contract
from edge_agent.mlflow_io import Registry
from edge_agent.outbox import Report
from search.selection import ENERGY, LATENCY, Limits, SelectionError, main, select_champion

ROOT = Path(__file__).resolve().parents[1]
ORIN, CPU = "orin-nano", "cpu-x"


pytestmark = [pytest.mark.usefixtures("mlflow_fail_fast"), pytest.mark.e2e]  # real MLflow servers


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def make_study(
    uri: str,
    experiment: str,
    model: str,
    trials: list[tuple],
    start_time: int | None = None,
    devices: tuple[str, ...] = (ORIN, CPU),
) -> tuple[str, dict[str, tuple[str, str]]]:
    """A study run, its trials (name, embed_dim, rank, alpha, psnr) and a version for each.

    Returns (study run id, {trial name: (run id, version)}); every version is pending on ``devices``.
    """
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    study = c.create_run(
        exp_id,
        run_name=f"{experiment}-study",
        start_time=start_time,
        tags={contract.ROLE: contract.ROLE_STUDY},
    ).info.run_id
    if not c.search_registered_models(f"name='{model}'"):
        c.create_registered_model(model)
    out = {}
    for name, embed_dim, rank, alpha, psnr in trials:
        tags = {contract.ROLE: contract.ROLE_TRIAL, "mlflow.parentRunId": study}
        run = c.create_run(exp_id, run_name=name, tags=tags).info.run_id
        for k, v in (("embed_dim", embed_dim), ("rank", rank), ("alpha", alpha)):
            if v is not None:  # a reference model has no knobs
                c.log_param(run, k, v)
        c.log_metric(run, "val_psnr_y", psnr)
        c.set_terminated(run)
        version_tags = {
            contract.TAG_TRIAL_RUN: run,
            **{contract.status_tag(d): contract.PENDING for d in devices},
        }
        v = c.create_model_version(model, source=f"runs:/{run}/onnx", run_id=run, tags=version_tags)
        out[name] = (run, str(v.version))
    return study, out


def measure(uri: str, model: str, candidate: tuple[str, str], device: str, **metrics: float) -> None:
    """Report figures the way the agent does; no power figures means the power source is unavailable."""
    run_id, version = candidate
    source = "ina3221" if "power_mw" in metrics else "unavailable"
    report = Report(
        result_id=f"{model}-{version}-{device}",
        model_name=model,
        version=version,
        run_id=run_id,
        device=device,
        status=contract.DONE,
        timestamp_ms=int(time.time() * 1000),
        metrics={"latency_ms_p90": metrics["latency_ms_p50"] * 1.1, "throughput_ips": 1.0, **metrics},
        tags={contract.TAG_BACKEND: "tensorrt", contract.TAG_POWER_SOURCE: source},
    )
    Registry(uri, model).deliver(report)


def fail(uri: str, model: str, candidate: tuple[str, str], device: str, error: str) -> None:
    run_id, version = candidate
    report = Report(
        f"{model}-{version}-{device}-f", model, version, run_id, device, contract.FAILED, 1, error=error
    )
    Registry(uri, model).deliver(report)


def champion(uri: str, model: str) -> str:
    return str(client(uri).get_model_version_by_alias(model, contract.CHAMPION_ALIAS).version)


@pytest.fixture(scope="module")
def powered(server):
    """Six candidates measured on orin-nano with power (one pending, one failed); an older study beside."""
    exp, model = "sel-power", "m-sel-power"
    # an older study with a candidate better in every way: never considered for the latest study
    _, old = make_study(
        server, exp, model, [("old", 48, 4, 0.5, 40.0)], start_time=int(time.time() * 1000) - 60_000
    )
    measure(
        server,
        model,
        old["old"],
        ORIN,
        latency_ms_p50=0.5,
        latency_ms_p99=0.6,
        power_mw=1000,
        energy_mj_per_image=0.1,
    )
    study, c = make_study(
        server,
        exp,
        model,
        [
            ("a", 16, 2, 0.5, 26.0),
            ("b", 24, 4, 0.5, 27.0),
            ("c", 32, 8, 0.7, 27.5),
            ("d", 24, 2, 0.3, 26.5),
            ("e", 40, 8, 0.5, 28.0),
            ("f", 48, 16, 0.5, 29.0),
        ],
    )
    figures = {  # (energy mJ/image, latency p50 ms, power mW)
        "a": (1.0, 2.0, 2500),
        "b": (2.0, 3.0, 3000),
        "c": (4.0, 6.0, 4000),
        "d": (3.0, 4.0, 3500),  # dominated by b: lower PSNR, more energy, slower
    }
    for name, (energy, p50, power) in figures.items():
        measure(
            server,
            model,
            c[name],
            ORIN,
            latency_ms_p50=p50,
            latency_ms_p99=p50 * 1.5,
            power_mw=power,
            idle_power_mw=2000,
            energy_mj_per_image=energy,
        )
    fail(server, model, c["f"], ORIN, "TensorRT: engine build failed")
    # "e" stays pending; one cpu-x measurement, so orin-nano (4 done) is the device found by itself
    measure(server, model, c["a"], CPU, latency_ms_p50=20.0, latency_ms_p99=25.0)
    return {"uri": server, "experiment": exp, "model": model, "study": study, "c": c}


def select(data: dict, **kw):
    return select_champion(data["uri"], data["experiment"], model_name=data["model"], **kw)


def test_knee_on_a_constructed_front_sets_alias_tags_and_report(powered):
    # front a, b, c (d is dominated by b). Normalised over the front, best = 0:
    #   PSNR 26..27.5 (span 1.5): a 1, b 1/3, c 0;  energy 1..4: a 0, b 1/3, c 1;  p50 2..6: a 0, b 1/4, c 1
    #   distances: a 1, b sqrt(1/9 + 1/9 + 1/16) = 0.53, c sqrt(2) = 1.41  ->  b
    sel = select(powered)
    c = powered["c"]
    assert sel.device == ORIN and sel.cost == ENERGY
    assert sel.champion.version == c["b"][1] and sel.champion.run_id == c["b"][0]
    assert champion(powered["uri"], powered["model"]) == c["b"][1]
    rows = {r.run_name: r for r in sel.rows}
    assert sorted(rows) == ["a", "b", "c", "d", "e", "f"]  # the older study's candidate is not here
    assert {n for n, r in rows.items() if r.on_front} == {"a", "b", "c"}
    assert [n for n, r in rows.items() if r.chosen] == ["b"]
    assert rows["b"].knobs == {"embed_dim": 24, "rank": 4, "alpha": 0.5}
    assert rows["b"].power_mw == 3000 and rows["b"].latency_ms_p99 == 4.5 and rows["b"].psnr == 27.0
    # pending and failed: shown with their status, no figures, never judged or chosen
    assert rows["e"].status == contract.PENDING and rows["e"].latency_ms_p50 is None
    assert rows["f"].status == contract.FAILED and "engine build failed" in rows["f"].note
    assert rows["e"].within_limits is None and rows["f"].within_limits is None

    tags = client(powered["uri"]).get_run(powered["study"]).data.tags
    assert tags["selection.champion_version"] == c["b"][1]
    assert (tags["selection.rule"], tags["selection.device"], tags["selection.limits"]) == (
        "knee",
        ORIN,
        "none",
    )
    listed = {Path(f.path).name for f in client(powered["uri"]).list_artifacts(powered["study"], "selection")}
    assert listed == {"table.md", "selection.json"}
    plots = {Path(f.path).name for f in client(powered["uri"]).list_artifacts(powered["study"], "pareto")}
    assert plots == {"pareto.png", "pareto.html"}  # the study's one plot
    # why it won, where a user looks: the study run's and the version's descriptions
    note = client(powered["uri"]).get_run(powered["study"]).data.tags["mlflow.note.content"]
    assert "### Champion" in note and f"models:/{powered['model']}@champion" in note
    assert sel.message in note  # said once, on the study's page; the version points there
    described = client(powered["uri"]).get_model_version(powered["model"], c["b"][1]).description
    assert described.count("**Champion**") == 1 and "why it won is on the study run's page" in described
    assert f"models:/{powered['model']}@champion" in described and sel.message not in described


def test_best_psnr_and_limits_move_the_choice(powered):
    c = powered["c"]
    assert select(powered, rule="best-psnr").champion.version == c["c"][1]  # 27.5 dB; e and f unmeasured
    assert champion(powered["uri"], powered["model"]) == c["c"][1]
    mc = client(powered["uri"])
    select(powered)  # the knee again (b), then best-psnr: b's description loses its champion paragraph
    select(powered, rule="best-psnr")
    assert "**Champion**" not in (mc.get_model_version(powered["model"], c["b"][1]).description or "")
    assert "@champion" not in (mc.get_model_version(powered["model"], c["b"][1]).description or "")
    assert "**Champion**" in mc.get_model_version(powered["model"], c["c"][1]).description
    # latency <= 3.5 (these agents reported p50s only: the fallback) leaves a and b; on that front a
    # is 1 from the ideal (PSNR), b sqrt(2)  ->  a
    sel = select(powered, limits=Limits(max_latency_ms=3.5))
    assert sel.champion.version == c["a"][1]
    rows = {r.run_name: r for r in sel.rows}
    assert rows["c"].within_limits is False and "latency_ms_mean <= 3.5" in rows["c"].note
    assert {n for n, r in rows.items() if r.on_front} == {"a", "b"}
    assert select(powered, limits=Limits(min_psnr=26.8, max_power_mw=3500)).champion.version == c["b"][1]


def test_limits_that_exclude_everything_leave_the_alias(powered, capsys):
    previous = select(powered).champion.version  # b, as above
    with pytest.raises(
        SelectionError, match=r"none within the limits: power_mw <= 2000 excludes 4 \(lowest 2500\)"
    ):
        select(powered, limits=Limits(max_power_mw=2000))
    capsys.readouterr()
    argv = [
        "--experiment",
        powered["experiment"],
        "--tracking-uri",
        powered["uri"],
        "--model-name",
        powered["model"],
    ]
    assert main([*argv, "--max-power-mw", "2000", "--min-psnr", "27.2"]) == 1
    out, err = capsys.readouterr()
    assert "power_mw <= 2000 excludes 4" in err and "val_psnr_y >= 27.2 excludes 3 (highest 27.5)" in err
    assert f"alias stays on v{previous}" in err
    assert "engine build failed" in out and "pending" in out  # the table is still printed
    assert champion(powered["uri"], powered["model"]) == previous


def test_device_given_without_power_compares_latency_only(powered):
    # only "a" is measured on cpu-x (no power sensor)
    sel = select(powered, device=CPU)
    assert sel.cost == LATENCY and "no power measured (power source: unavailable)" in sel.message
    assert sel.champion.version == powered["c"]["a"][1]
    assert sum(r.status == contract.DONE for r in sel.rows) == 1
    select(powered)  # leave orin-nano's choice as the alias


@pytest.fixture(scope="module")
def unpowered(server):
    """Four candidates measured on a device without a power sensor."""
    exp, model = "sel-nopower", "m-sel-nopower"
    study, c = make_study(
        server,
        exp,
        model,
        [("g", 16, 1, 0.0, 25.0), ("h", 24, 2, 0.5, 26.0), ("i", 32, 4, 1.0, 26.5), ("j", 24, 4, 0.5, 25.5)],
    )
    for name, p50 in (("g", 1.0), ("h", 2.0), ("i", 8.0), ("j", 3.0)):  # j dominated by h
        measure(server, model, c[name], CPU, latency_ms_p50=p50, latency_ms_p99=p50 * 2)
    return {"uri": server, "experiment": exp, "model": model, "study": study, "c": c}


def test_latency_only_knee_and_the_power_limit_that_cannot_be_checked(unpowered, capsys):
    # front g, h, i. PSNR 25..26.5: g 1, h 1/3, i 0;  p50 1..8: g 0, h 1/7, i 1  ->  h (0.36)
    sel = select(unpowered)
    assert sel.device == CPU and sel.cost == LATENCY
    assert "no power measured (power source: unavailable); the cost compared is latency only" in sel.message
    assert sel.champion.version == unpowered["c"]["h"][1]
    assert all(r.power_mw is None and r.energy_mj_per_image is None for r in sel.rows)
    with pytest.raises(
        SelectionError, match="--max-power-mw 3000 was asked, but cpu-x measured no power"
    ) as exc:
        select(unpowered, limits=Limits(max_power_mw=3000))
    assert "power source is unavailable" in str(exc.value)
    capsys.readouterr()
    argv = [
        "--experiment",
        unpowered["experiment"],
        "--tracking-uri",
        unpowered["uri"],
        "--model-name",
        unpowered["model"],
    ]
    assert main([*argv, "--max-power-mw", "3000", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["champion_version"] is None and "unavailable" in out["message"] and len(out["rows"]) == 4
    assert champion(unpowered["uri"], unpowered["model"]) == unpowered["c"]["h"][1]


@pytest.mark.parametrize("how", ["module", "console script"])
def test_selection_runs_from_the_command_line(unpowered, how):
    start = [sys.executable, "-m", "search.selection"]
    if how == "console script":
        start = [str(Path(sys.executable).parent / "mambalitesr-select")]
    cmd = [*start, "--experiment", unpowered["experiment"]]
    cmd += ["--tracking-uri", unpowered["uri"], "--model-name", unpowered["model"], "--rule", "best-psnr"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "champion: v" + unpowered["c"]["i"][1] in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("*"))
    assert f"v{unpowered['c']['i'][1]}" in line


def test_unstable_candidates_are_never_ranked_and_a_margin_within_noise_is_said(server):
    """The agent marks a candidate whose windows disagreed twice as unstable: it shows in the table
    with why, and is not chosen even where it dominates. Two candidates whose latencies differ by
    less than their spreads across windows: the message says the champion cannot be told apart."""
    exp, model = "sel-noise", "m-sel-noise"
    _, c = make_study(
        server, exp, model, [("s", 16, 2, 0.5, 26.0), ("t", 24, 2, 0.5, 27.0), ("u", 32, 2, 0.5, 30.0)]
    )
    spread = dict(latency_ms_std=0.05, latency_cv=0.025, unstable=0.0)
    # compared on the means (the p50s say the opposite: the means decide)
    measure(server, model, c["s"], CPU, latency_ms_mean=2.0, latency_ms_p50=2.3, latency_ms_p99=3.0, **spread)
    measure(
        server, model, c["t"], CPU, latency_ms_mean=2.05, latency_ms_p50=1.9, latency_ms_p99=3.0, **spread
    )
    shaky = dict(latency_ms_std=0.3, latency_cv=0.3, unstable=1.0)
    measure(server, model, c["u"], CPU, latency_ms_p50=1.0, latency_ms_p99=3.0, **shaky)
    sel = select_champion(server, exp, model_name=model)
    # front s, t (u is out): a tie on the knee goes to the higher PSNR
    assert sel.champion.version == c["t"][1]
    u = next(r for r in sel.rows if r.version == c["u"][1])
    assert (
        u.unstable and not u.measured and not u.on_front and "unstable: its figures varied by 30.0%" in u.note
    )
    assert f"runner-up v{c['s'][1]} (s, C16 r2 a0.50, val_psnr_y 26.000 dB)" in sel.message
    assert (
        "differs from the champion by -0.05 ms in mean latency, within the measurement noise (+/-0.1 ms"
        in sel.message
    )
    # every candidate unstable: nothing to choose, and the reason is given
    _, only = make_study(server, "sel-shaky", "m-shaky", [("w", 16, 2, 0.5, 26.0)], devices=(CPU,))
    measure(server, "m-shaky", only["w"], CPU, latency_ms_p50=1.0, latency_ms_p99=3.0, **shaky)
    with pytest.raises(SelectionError, match=r"\(1 unstable\)"):
        select_champion(server, "sel-shaky", model_name="m-shaky")


def test_references_are_compared_never_chosen_and_one_that_dominates_is_named(server):
    """Reference models (bicubic, a conv net, the hand pick) registered beside a study's candidates:
    measured by the same agent, shown in the table, never the champion; the message names a
    reference that dominates the champion, and a study whose only measured rows are references has
    nothing to choose."""
    from search import study
    from search.study import TAG_REFERENCE

    exp, model = "sel-refs", "m-sel-refs"
    trials = [("a", 16, 2, 0.5, 28.0), ("b", 32, 2, 0.5, 29.0), ("bicubic", None, None, None, 26.0)]
    trials += [("fsrcnn", None, None, None, 29.5)]
    _, c = make_study(server, exp, model, trials, devices=(CPU,))
    for name in ("bicubic", "fsrcnn"):
        client(server).set_tag(c[name][0], TAG_REFERENCE, name)
    spread = dict(latency_ms_std=0.01, latency_cv=0.01, unstable=0.0)
    for name, p50 in (("a", 5.0), ("b", 9.0), ("bicubic", 0.5), ("fsrcnn", 4.0)):
        measure(server, model, c[name], CPU, latency_ms_p50=p50, latency_ms_p99=p50 * 2, **spread)
    sel = select_champion(server, exp, model_name=model, rule="best-psnr")
    assert sel.champion.version == c["b"][1]  # fsrcnn has the best PSNR, but is a reference
    refs = {r.reference: r for r in sel.rows if r.reference}
    assert set(refs) == {"bicubic", "fsrcnn"} and not any(r.chosen or r.on_front for r in refs.values())
    assert refs["bicubic"].note == "reference (bicubic): compared, never chosen"
    assert refs["fsrcnn"].label == f"v{c['fsrcnn'][1]} fsrcnn" and refs["fsrcnn"].knobs == {}
    assert (
        f"The reference fsrcnn (v{c['fsrcnn'][1]}: val_psnr_y 29.500 dB, latency 4.000 ms mean "
        "(SD 0.01 ms across windows))" in sel.message
    )
    assert "bicubic" not in sel.message  # it does not dominate the champion: less PSNR
    assert champion(server, model) == c["b"][1]
    # nor are they points of the cost model the loop fits on the device's measurements
    exp_id = client(server).get_experiment_by_name(exp).experiment_id
    points = study.measurements(server, exp_id, model, CPU, "latency_ms_p50")
    assert sorted(p.version for p in points) == sorted([c["a"][1], c["b"][1]])
    # the candidates measured but outside a limit that a reference meets: nothing to choose, and why
    with pytest.raises(
        SelectionError, match=r"none within the limits: .*1 reference\(s\) are, but references"
    ):
        select_champion(server, exp, model_name=model, limits=Limits(max_latency_ms=1.0))
    # only references measured: the candidates are what is missing
    _, only = make_study(server, "sel-refs-only", "m-refs-only", trials[:1] + trials[2:3], devices=(CPU,))
    client(server).set_tag(only["bicubic"][0], TAG_REFERENCE, "bicubic")
    measure(server, "m-refs-only", only["bicubic"], CPU, latency_ms_p50=0.5, latency_ms_p99=1.0, **spread)
    with pytest.raises(
        SelectionError, match=r"none of the 1 candidates .* is measured on cpu-x \(1 pending\)"
    ):
        select_champion(server, "sel-refs-only", model_name="m-refs-only")


def test_nothing_measured_and_bad_input(server, capsys):
    trials = [("p", 16, 2, 0.5, 25.0), ("q", 24, 2, 0.5, 26.0)]
    make_study(server, "sel-pending", "m-pending", trials, devices=(ORIN,))
    with pytest.raises(
        SelectionError, match=r"\(2 pending\)\. The edge agent must measure them first"
    ) as exc:
        select_champion(server, "sel-pending", model_name="m-pending")
    assert f"edge-agent run --device {ORIN} --tracking-uri {server}" in str(exc.value)
    assert [r.status for r in exc.value.selection.rows] == [contract.PENDING] * 2

    base = ["--tracking-uri", server, "--model-name", "m-pending"]
    assert main(["--experiment", "sel-pending", *base]) == 1
    assert main(["--experiment", "no-such-experiment", *base]) == 2
    assert "there is no experiment 'no-such-experiment'" in capsys.readouterr().err
    client(server).create_experiment("sel-empty")
    assert main(["--experiment", "sel-empty", *base]) == 2
    assert "has no study run" in capsys.readouterr().err
    assert main(["--experiment", "sel-pending", "--study", "0" * 32, *base]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["--experiment", "sel-pending", "--rule", "median", *base])
    assert exit_.value.code == 2


def test_every_page_is_read(powered):
    from search import mlflow_util

    c = client(powered["uri"])
    query = f"name='{powered['model']}'"
    assert len(c.search_model_versions(query, max_results=2)) == 2  # one page of seven
    versions = mlflow_util.all_pages(c.search_model_versions, query, max_results=2)
    assert sorted(int(v.version) for v in versions) == list(range(1, 8))
    exp_id = c.get_experiment_by_name(powered["experiment"]).experiment_id
    runs = mlflow_util.all_pages(
        c.search_runs, [exp_id], f"tags.`{contract.ROLE}` = '{contract.ROLE_TRIAL}'", max_results=3
    )
    assert len({r.info.run_id for r in runs}) == 7
