"""The whole loop end to end: search (real local Ray) -> registration -> the edge agent (a real
`edge-agent run` process started by the search) -> selection, against a real MLflow server."""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent import contract
from search.pareto import pareto_front

from fakes import FakeIna3221

ROOT = Path(__file__).resolve().parents[1]
# the whole loop: an MLflow server, Ray, the agent
pytestmark = [pytest.mark.e2e, pytest.mark.ray]
DEVICE = "local-cpu"  # search/configs/smoke.yaml's loop.device


def search(
    args: list[str], cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    cmd = [sys.executable, str(ROOT / "search" / "run.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def measured(client, versions, metric):
    out = {}
    for v in versions:
        if v.tags.get(contract.status_tag(DEVICE)) == contract.DONE:
            run = client.get_run(v.run_id)
            out[v.version] = (
                run.data.metrics["val_psnr_y"],
                run.data.metrics[contract.edge_key(DEVICE, metric)],
            )
    return out


def files_holding(needles: list[bytes], roots: list[Path]) -> list[str]:
    """Every regular file under ``roots`` whose bytes contain one of ``needles`` (pickles, SQLite
    and logs alike: a string in them is stored as its bytes)."""
    found = []
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    data = Path(path).read_bytes()
                    if any(n in data for n in needles):
                        found.append(path)
    return found


def mlflow_holding(client, needle: str) -> list[str]:
    """Every param and tag of every run, experiment, registered model and version, and every
    version's description, holding ``needle``."""
    from mlflow.entities import ViewType

    found = []
    for exp in client.search_experiments(view_type=ViewType.ALL):
        found += [f"experiment {exp.name}: tag {k}" for k, v in exp.tags.items() if needle in k + v]
        for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=50000):
            for kind, items in (("param", run.data.params), ("tag", run.data.tags)):
                found += [f"run {run.info.run_id}: {kind} {k}" for k, v in items.items() if needle in k + v]
    for model in client.search_registered_models():
        found += [f"model {model.name}: tag {k}" for k, v in model.tags.items() if needle in k + v]
        for v in client.search_model_versions(f"name='{model.name}'"):
            found += [f"version {v.version}: tag {k}" for k, val in v.tags.items() if needle in k + val]
            found += [f"version {v.version}: description"] if needle in (v.description or "") else []
    return found


def assert_nothing_left_behind(secret: str, out, roots: list[Path], client, study_run_id: str) -> None:
    """The planted secret is in no output, file, param or tag; no half-written file either."""
    needles = [secret.encode(), base64.b64encode(f"someuser:{secret}".encode())]  # Basic auth too
    assert not [n for n in needles if n.decode() in out.stdout + out.stderr]
    assert files_holding(needles, roots) == []
    assert mlflow_holding(client, secret) == []
    assert not [p for root in roots for p in root.rglob("*.partial")]  # none left by Ray's syncer
    assert "FileNotFoundError" not in out.stdout + out.stderr
    # the greps can fail: a copy planted in a pickle in Ray's folder, and one in a run tag, are found
    planted = roots[-1] / "planted" / "env.pkl"
    planted.parent.mkdir()
    planted.write_bytes(pickle.dumps({"MLFLOW_TRACKING_PASSWORD": secret}))
    assert files_holding(needles, roots) == [str(planted)]
    client.set_tag(study_run_id, "planted", secret)
    assert mlflow_holding(client, secret) == [f"run {study_run_id}: tag planted"]
    client.delete_tag(study_run_id, "planted")
    shutil.rmtree(planted.parent)


def test_smoke_run_measures_on_the_cpu_and_picks_a_champion(smoke_study):
    """Also: a password given the supported way (MLflow's own variable) is nowhere in
    what the run leaves, and no half-written checkpoint reached Ray's storage."""
    from mlflow.tracking import MlflowClient

    out, report, server = smoke_study["out"], smoke_study["report"], smoke_study["uri"]
    # the working dir (Ray's storage, the agent's log and state), the server's, Ray's session folder
    roots = [smoke_study["work"], smoke_study["server_root"], smoke_study["ray_tmp"]]
    client = MlflowClient(server)
    assert_nothing_left_behind(smoke_study["secret"], out, roots, client, report["study_run_id"])
    assert "started the local edge agent" in out.stdout and "champion: v" in out.stdout
    # the champion (a finalized version: its run is the finalization's) named with its knobs
    assert re.search(r"champion: v\d+ \(finalize t\d+ C\d+ r\d+ a[\d.]+\)", out.stdout)
    versions = [
        v
        for v in client.search_model_versions(f"name='{contract.REGISTERED_MODEL}'")
        if client.get_run(v.run_id).data.tags.get("mlflow.parentRunId") == report["study_run_id"]
    ]
    assert versions and all(v.tags[contract.status_tag(DEVICE)] == contract.DONE for v in versions)
    for v in versions:
        tags = client.get_run(v.run_id).data.tags
        assert tags[contract.edge_key(DEVICE, "power_source")] == "unavailable"
        assert tags[contract.edge_key(DEVICE, "backend")] == "onnxruntime"
    # no power sensor here: the champion must be on the front of PSNR (up) against mean latency (down)
    points = measured(client, versions, "latency_ms_mean")
    alias = client.get_model_version_by_alias(contract.REGISTERED_MODEL, contract.CHAMPION_ALIAS).version
    assert alias == str(report["champion"]["champion_version"])
    order = list(points)
    front = {order[i] for i in pareto_front([points[v] for v in order], ("max", "min"))}
    assert alias in front
    assert report["timings_s"]["round1_measure_s"] > 0


def _busy_fraction():
    """Share of CPU time not idle since the previous call, from /proc/stat (whole machine)."""
    last = [None]
    busy = [0.0]

    def f(_t: float) -> float:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        total, idle = sum(vals), vals[3] + vals[4]
        if last[0] is not None and total - last[0][0] >= 4:  # a few jiffies: a meaningful share
            busy[0] = 1.0 - (idle - last[0][1]) / (total - last[0][0])
            last[0] = (total, idle)
        elif last[0] is None:
            last[0] = (total, idle)
        return 3000.0 + 4000.0 * busy[0]  # a module idling at 3 W that draws up to 7 W under load

    return f


def test_two_rounds_learn_energy_from_a_fake_sensor(server, tmp_path):
    from mlflow.tracking import MlflowClient

    tree = FakeIna3221(tmp_path / "root", _busy_fraction(), rate_hz=50.0)
    cfg = yaml.safe_load((ROOT / "search" / "configs" / "smoke.yaml").read_text())
    # short windows (the smoke config's are 1 s, 1 s and 3 s): 50 samples each at 50 Hz
    cfg["loop"]["agent_args"] = ["--warmup-s", "0.5", "--idle-s", "0.5", "--duration-s", "0.5"]
    cfg["loop"]["agent_args"] += ["--windows", "2", "--pause-s", "0.2", "--max-cv", "10"]
    cfg["loop"]["agent_args"] += ["--power", "ina3221", "--power-root", str(tree.root)]
    # every trial trains fully: which trials complete (and so the front round 2 learns from) must not
    # depend on which of two concurrent trials reaches a rung first
    cfg["early_stopping"]["enabled"] = False
    cfg["registry"]["fp16"] = False  # this CPU measures in float32; the smoke study checks fp16
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump(cfg))
    try:
        out = search(
            ["--config", str(config), "--tracking-uri", server, "--experiment", "loop-power"]
            + ["--storage-dir", str(tmp_path / "s"), "--json", str(tmp_path / "r.json")]
            + ["--rounds", "2", "--objective", "edge_energy", "--num-samples", "4"],
            tmp_path,
        )
    finally:
        tree.close()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    client = MlflowClient(server)
    study_run = client.get_run(report["study_run_id"])

    # round 1 had no measurements: FLOPs, said so; round 2 had a model fitted on round 1's
    assert "round 1: 0 measurement(s) of energy_mj_per_image" in out.stdout
    assert "this round minimises FLOPs instead of edge_energy" in out.stdout
    assert "round 2: cost model of energy_mj_per_image on 'local-cpu' fitted on" in out.stdout
    points = client.get_metric_history(study_run.info.run_id, "costmodel_points")
    assert [p.step for p in points] == [1, 2] and points[0].value >= 2

    trials = [r for r in report["trials"]]
    assert {r["round"] for r in trials} == {1, 2}
    for r in trials:
        if r["round"] == 2 and r["run_id"] and r["status"] != "failed":
            run = client.get_run(r["run_id"])
            assert run.data.tags["search.cost_source"] == "costmodel"
            assert f"pred.{DEVICE}.energy_mj_per_image" in run.data.metrics
    # measured values win: every measured trial's cost is its measurement
    for r in trials:
        if r["cost_source"] == "measured":
            run = client.get_run(r["run_id"])
            assert r["cost"] == run.data.metrics[contract.edge_key(DEVICE, "energy_mj_per_image")]

    # selection took the power path
    champion = report["champion"]
    assert champion["cost"] == "energy_mj_per_image" and champion["champion_version"] is not None
    versions = [
        client.get_model_version(contract.REGISTERED_MODEL, str(row["version"])) for row in champion["rows"]
    ]
    for v in versions:
        if v.tags.get(contract.status_tag(DEVICE)) == contract.DONE:
            tags = client.get_run(v.run_id).data.tags
            assert tags[contract.edge_key(DEVICE, "power_source")] == "ina3221"
            metrics = client.get_run(v.run_id).data.metrics
            assert 3000 <= metrics[contract.edge_key(DEVICE, "power_mw")] <= 7000
