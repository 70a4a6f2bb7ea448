"""The real study's script (benchmarks/real_study.py) at smoke scale: every stage, its summary, and a
kill -9 during the front's finalization that a rerun recovers from without losing anything."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_agent import contract
from search import study

from conftest import ROOT, write_png

pytestmark = pytest.mark.e2e

FINALIZE_STEPS = 480  # long enough for the kill to land inside a finalization (8 s here; 120 took 2)


def photos(folder: Path, n: int, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n):
        hr = (rng.random((h, w, 3)) * 60 + np.linspace(0, 180, w)[None, :, None]).astype(np.uint8)
        write_png(folder / f"img_{i:02d}.png", hr)
    return folder


def smoke_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "search" / "configs" / "smoke.yaml").read_text())
    cfg.update(experiment="real-smoke", num_samples=2)
    cfg["registry"] = {
        "model_name": "m-real-smoke",
        "devices": ["local-cpu"],
        "input_size": 32,
        "fp16": False,
    }
    cfg["finalize"] = {"iterations": FINALIZE_STEPS}
    path = tmp_path / "real-smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_real_study_survives_a_kill_9_in_finalization_and_reports_every_model(tmp_path):
    train = photos(tmp_path / "photos", 8, (64, 64), seed=0)
    bench = tmp_path / "bench"
    for i, name in enumerate(("Set5", "Set14", "BSD100")):
        photos(bench / name / "HR", 2, (160, 128), seed=i + 1)  # LR 40x32: at least a 32x32 tile
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.real_study",
        "--out",
        str(out),
        "--config",
        str(smoke_config(tmp_path)),
    ]
    cmd += ["--train-data", str(train), "--val-images", "2", "--bench", str(bench)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    # the first attempt: the whole process group killed once a finalization has checkpointed
    from mlflow.tracking import MlflowClient

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    client, killed_at = MlflowClient(f"sqlite:///{out / 'mlflow.db'}"), None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None and killed_at is None:
        exp = client.get_experiment_by_name("real-smoke") if (out / "mlflow.db").exists() else None
        runs = (
            client.search_runs([exp.experiment_id], f"tags.`{contract.ROLE}` = '{study.ROLE_FINALIZE}'")
            if exp
            else []
        )
        for r in runs:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_psnr_y")]
            if steps and max(steps) < FINALIZE_STEPS:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = (r.data.tags[study.TAG_FINALIZED_FROM], max(steps))
                break
        time.sleep(0.2)
    proc.wait()
    log.close()
    assert killed_at is not None, (tmp_path / "first.log").read_text()[-3000:]
    exp = client.get_experiment_by_name("real-smoke")
    trials_before = {
        r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "val_psnr_y")]
        for r in client.search_runs([exp.experiment_id], f"tags.`{contract.ROLE}` = 'trial'")
    }
    time.sleep(2)  # Ray's processes of the killed attempt see their driver gone

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())

    # nothing lost: no trial trained again; the killed finalization went on from its checkpoint
    for run_id, steps in trials_before.items():
        assert [m.step for m in client.get_metric_history(run_id, "val_psnr_y")] == steps
    trial, step = killed_at
    finals = client.search_runs([exp.experiment_id], f"tags.`{study.TAG_FINALIZED_FROM}` = '{trial}'")
    first_steps = sorted(
        min(m.step for m in client.get_metric_history(r.info.run_id, "val_psnr_y")) for r in finals
    )
    assert len(finals) == 2 and first_steps[1] > step, first_steps  # the second run began past the kill

    # the summary: every stage timed, every model with its figures
    assert set(summary) >= {
        "wall_s",
        "stages_s",
        "search_cpu_s",
        "champion",
        "hand_pick",
        "front",
        "references",
    }
    assert {"split", "study", "references", "measure", "select", "evaluate"} <= set(summary["stages_s"])
    assert "study.round1_search_s" in summary["stages_s"] and summary["wall_s"] > 0
    assert summary["resumed_stages"] == ["study"]  # killed in its finalization: its time is the rerun's
    refs = {e["name"]: e for e in summary["references"]}
    assert set(refs) == {"bicubic", "fsrcnn", "espcn", "fsrcnn-student"}
    hand = summary["hand_pick"]
    assert hand["knobs"] == {"embed_dim": 32, "rank": 2, "alpha": 0.8}
    assert summary["champion"]["name"] in {e["name"] for e in summary["front"]}
    entries = [summary["champion"], hand, *summary["front"], *refs.values()]
    for e in entries:
        assert set(e["psnr_y"]) == {"Set5", "Set14", "BSD100"} and all(
            math.isfinite(v) for v in e["psnr_y"].values()
        )
        assert e["latency_ms_mean"] > 0 and e["latency_ms_sd"] >= 0 and Path(e["onnx"]).is_file()
        assert math.isfinite(e["cpu_s"]) and e["params"] >= 0 and e["gflops"] > 0
    assert (
        refs["bicubic"]["cpu_s"] == 0 and refs["bicubic"]["params"] == 0 and refs["bicubic"]["knobs"] is None
    )
    assert all(e["cpu_s"] > 0 for e in [hand, *summary["front"], refs["fsrcnn"]])
    assert summary["search_cpu_s"] >= sum(e["cpu_s"] for e in summary["front"])
    assert (out / "front.png").stat().st_size > 0
    # the references are on the selection's table and never its champion
    selection = json.loads((out / "selection.json").read_text())
    chosen = [r for r in selection["rows"] if r["chosen"]]
    assert len(chosen) == 1 and not chosen[0]["reference"]
    assert {r["reference"] for r in selection["rows"] if r["reference"]} == {"hand-pick", *refs}

    # a third run has nothing left to do but the summary
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done before") == 6, again.stdout[-2000:]


def test_a_study_without_a_champion_stops_the_references_with_the_study_s_reason(tmp_path):
    from benchmarks import real_study

    out = tmp_path / "out"
    out.mkdir()
    said = "selection: none of the 1 candidates of study run abc is measured on local-cpu (1 unstable)."
    (out / "study.log").write_text(f"trial table\n{said}\nstage wall times (s): select_s 0.1\n")
    run = real_study.Run(real_study.parse_args(["--out", str(out), "--config", str(smoke_config(tmp_path))]))
    with pytest.raises(SystemExit) as exc:
        run.champion()
    message = str(exc.value)
    assert "chose no champion" in message and said in message and "Traceback" not in message
    assert "python -m search.selection --experiment real-smoke" in message and "m-real-smoke" in message
