"""The smoke search end to end: a real MLflow server, a real local Ray, registered ONNX versions."""

import hashlib
import json
import os
import re
import shlex
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
from search.config import knob_names
from search.trainable import FINAL_QUALITY

from servers import pid_namespaces

ROOT = Path(__file__).resolve().parents[1]
# search/run.py in a subprocess: Ray, MLflow
pytestmark = [pytest.mark.e2e, pytest.mark.ray]
RUN = [sys.executable, str(ROOT / "search" / "run.py"), "--smoke-test"]
SMALL_DISK_KB = 600  # room for the study's first files, not for its trials' results


def search(args, cwd, timeout=900, extra_env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    cmd = RUN[:-1] + args if "--config" in args else RUN + args  # --smoke-test is a config of its own
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def driver_tracebacks(stderr: str) -> list[str]:
    """The search's own tracebacks in its stderr; not those Ray's workers print, which Ray forwards
    with a ``(name pid=N)`` prefix (a trial process shutting down, say). Ray's traceback for its
    state-copy race is one line in the driver (``search.compat.quiet_state_copy_race``), so it
    counts here when it comes back."""
    return [line for line in stderr.splitlines() if "Traceback" in line and "pid=" not in line]


def given_teacher(tmp_path: Path) -> Path:
    """A teacher checkpoint for the config's ``teacher.checkpoint`` (the tiny network, untrained):
    for the tests about trials, which need not train the study's teacher first."""
    import dataclasses

    import torch

    from model import build_model

    teacher = build_model("tiny")
    path = tmp_path / "teacher.pt"
    torch.save({"model_config": dataclasses.asdict(teacher.cfg), "model": teacher.state_dict()}, path)
    return path


def search_only(tmp_path: Path, teacher: Path | None = None) -> list[str]:
    """``--config`` of the smoke search without its loop stages (the local edge agent, selection),
    for the tests about trials: nothing here waits for measurements. ``teacher``: a checkpoint the
    study takes as its teacher instead of training one."""
    cfg = yaml.safe_load((ROOT / "search" / "configs" / "smoke.yaml").read_text())
    cfg["loop"].update(local_agent=False, select=False, agent_args=[])
    cfg["registry"]["fp16"] = False  # the float16 check is the smoke study's (a trace per candidate)
    if teacher is not None:
        cfg["teacher"]["checkpoint"] = str(teacher)
    path = tmp_path / "search-only.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["--config", str(path)]


def test_smoke_search_registers_verified_onnx_versions(smoke_study):
    """The smoke study (conftest's smoke_study), its front retrained for finalize.iterations steps
    and registered as verified ONNX versions."""
    import mlflow
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    smoke = yaml.safe_load((smoke_study["work"] / "smoke-finalized.yaml").read_text())
    steps = smoke["finalize"]["iterations"]
    server, report = smoke_study["uri"], smoke_study["report"]
    client = MlflowClient(server)
    study_run = client.get_run(report["study_run_id"])
    exp = client.get_experiment(study_run.info.experiment_id)
    assert study_run.info.status == "FINISHED" and study_run.data.tags[contract.ROLE] == contract.ROLE_STUDY
    handle = study.Study.of_run(server, study_run.info.run_id)
    assert handle.read_json(study.SUMMARY_ARTIFACT)["trials"] == smoke["num_samples"]
    assert set(handle.read_json(study.TIMINGS_ARTIFACT)) >= {"teacher_s", "round1_search_s", "select_s"}
    # the study's own figures are artifacts, not metrics: no study-only columns beside the trials
    assert not [k for k in study_run.data.metrics if k.startswith(("search_", "wall_"))]
    assert {a.path for a in client.list_artifacts(study_run.info.run_id, "pareto")} >= {
        "pareto/pareto.png",
        "pareto/pareto.html",
        "pareto/trials.txt",
        study.SUMMARY_ARTIFACT,
    }
    trials = client.search_runs([exp.experiment_id], f"tags.`{contract.ROLE}` = '{contract.ROLE_TRIAL}'")
    assert len(trials) == smoke["num_samples"] and all(t.info.status == "FINISHED" for t in trials)
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == study_run.info.run_id
        assert {"embed_dim", "rank", "alpha"} <= set(t.data.params)
        assert {"val_psnr_y", "flops_g", "params"} <= set(t.data.metrics)
    teacher = client.search_runs([exp.experiment_id], f"tags.`{contract.ROLE}` = '{contract.ROLE_TEACHER}'")
    assert len(teacher) == 1  # trained once for the whole study

    versions = client.search_model_versions(f"name='{contract.REGISTERED_MODEL}'")  # this study's alone
    front = [r for r in report["trials"] if r["version"] is not None]
    assert len(versions) == len(front) >= 1
    mlflow.set_tracking_uri(server)
    for v in versions:
        assert v.tags[contract.status_tag("orin-nano")] == contract.PENDING
        assert v.tags[contract.TAG_INPUT_SHAPE] == "1x3x32x32"
        path = Path(mlflow.artifacts.download_artifacts(f"models:/{v.name}/{v.version}")) / contract.ONNX_FILE
        assert hashlib.sha256(path.read_bytes()).hexdigest() == v.tags[contract.TAG_SHA256]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        y = sess.run(None, {sess.get_inputs()[0].name: np.random.rand(1, 3, 32, 32).astype(np.float32)})[0]
        assert y.shape == (1, 3, 128, 128) and np.isfinite(y).all()
        # finalized: the version is the trial's (measurements land there), its files the retraining's
        final = client.get_run(v.tags[study.TAG_WEIGHTS_RUN])
        assert final.data.tags[contract.ROLE] == study.ROLE_FINALIZE and final.info.status == "FINISHED"
        assert (
            final.data.tags[study.TAG_FINALIZED_FROM] == v.tags[contract.TAG_TRIAL_RUN]
            and v.run_id == final.info.run_id
        )
        assert final.data.params["iterations"] == str(steps)
        # its knobs as params (selection and the cost model read them from the version's run)
        trial = client.get_run(v.tags[contract.TAG_TRIAL_RUN])
        knobs = lambda run: {k: v for k, v in run.data.params.items() if k in knob_names()}  # noqa: E731
        assert knobs(final) == knobs(trial) and {"embed_dim", "rank", "alpha"} <= set(knobs(trial))
        assert final.info.run_name == f"finalize {trial.info.run_name.split(' · ')[0]}"
        # it went on from its trial's last weights (finalize.from_trial, the default)
        trial_steps = max(int(m.step) for m in client.get_metric_history(trial.info.run_id, "val_psnr_y"))
        assert int(final.data.tags[study.TAG_FROM_TRIAL_STEP]) == trial_steps > 0
        assert v.source.startswith(f"runs:/{final.info.run_id}/")
        trial = client.get_run(v.tags[contract.TAG_TRIAL_RUN])
        assert trial.data.metrics[FINAL_QUALITY] == final.data.metrics["val_psnr_y"]


def test_failed_trials_are_recorded_and_rerun_by_resume_once_the_cause_is_gone(server, tmp_path):
    from mlflow.tracking import MlflowClient

    from conftest import write_png

    # the trials' training images, one of them damaged: every trial fails on it (the study's
    # teacher is given, so nothing before the trials reads these images)
    images = tmp_path / "train"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_png(images / f"{name}.png", rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    (images / "c.png").write_bytes(b"\x89PNG damaged in transfer")
    config = search_only(tmp_path, teacher=given_teacher(tmp_path))
    cfg = yaml.safe_load(Path(config[1]).read_text())
    cfg["training"]["train_data"] = [str(images)]
    cfg["space"]["embed_dim"]["high"] = 8  # every student fits inside the tiny teacher: they inherit
    Path(config[1]).write_text(yaml.safe_dump(cfg))
    args = [*config, "--tracking-uri", server, "--experiment", "e2e-fail"]
    args += ["--num-samples", "2", "--storage-dir", str(tmp_path / "s"), "--json", str(tmp_path / "r.json")]
    out = search(args, tmp_path)
    # both trials ran although the first failed; a study with no trial left is a failed study
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all 2 trials of round 1 failed" in out.stderr and "c.png" in out.stderr
    client = MlflowClient(server)
    exp = client.get_experiment_by_name("e2e-fail")
    query = f"tags.`{contract.ROLE}` = '{contract.ROLE_TRIAL}'"
    runs = client.search_runs([exp.experiment_id], query)
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
    assert all(r.data.tags[study.TAG_VERDICT] == study.FAILED for r in runs)

    # the image is fixed; --resume runs the failed trials again, in their own runs
    write_png(images / "c.png", rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    out = search([*args, "--resume"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    again = client.search_runs([exp.experiment_id], query)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs), out.stdout[-6000:]
    assert all(r.info.status == "FINISHED" for r in again)
    assert all(r.data.tags[study.TAG_VERDICT] in (study.COMPLETE, study.STOPPED) for r in again)
    assert not [r for r in again if study.TAG_ERROR in r.data.tags]
    # training.init auto: the students started from their teacher, and the study says why
    assert all(r.data.params["init"] == "teacher" for r in again)
    assert "students start from the teacher's weights: every student of the space fits" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert [t["version"] for t in report["trials"] if t["version"]]  # the front is registered


def test_resume_after_the_driver_is_killed(tmp_path):
    """kill -9 the driver after one trial finished; --resume completes the study without redoing it.
    Nothing is registered (--no-register): the test is about the trials."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        *search_only(tmp_path),
        "--tracking-uri",
        uri,
        "--experiment",
        "e2e-resume",
        "--num-samples",
        "3",
        "--max-concurrent",
        "1",
        "--storage-dir",
        str(tmp_path / "s"),
        "--no-register",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(RUN[:-1] + args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    client, finished = MlflowClient(uri), []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("e2e-resume") if (tmp_path / "mlflow.db").exists() else None
        if exp is not None:
            finished = client.search_runs(
                [exp.experiment_id], f"tags.`{contract.ROLE}` = 'trial' and attributes.status = 'FINISHED'"
            )
            if finished:
                break
        time.sleep(0.3)
    assert proc.poll() is None, "the first run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    # a fast (early-stopped) trial can finish within one poll of the first: 1 or 2 may be done
    assert 1 <= len(finished) < 3
    steps_before = {
        r.info.run_id: sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_psnr_y"))
        for r in finished
    }

    out = search(["--resume", *args, "--json", str(tmp_path / "r.json")], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["trials"] == 3
    assert report["summary"]["front_size"] >= 1 and not [t for t in report["trials"] if t["version"]]
    exp = client.get_experiment_by_name("e2e-resume")
    runs = client.search_runs([exp.experiment_id], f"tags.`{contract.ROLE}` = 'trial'")
    assert len(runs) == 3 and len({r.data.tags["ray.trial_id"] for r in runs}) == 3
    states = {
        r.data.tags[study.TAG_TRIAL_ID]: (r.info.status, r.data.tags.get(study.TAG_EARLY_STOPPED))
        for r in runs
    }
    assert all(status == "FINISHED" for status, _ in states.values()), (states, out.stdout[-4000:])
    for run_id, steps in steps_before.items():  # the finished trials were not trained again
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_psnr_y")) == steps
    assert len(client.search_runs([exp.experiment_id], f"tags.`{contract.ROLE}` = 'teacher'")) == 1


def test_ctrl_c_is_an_interruption_and_a_damaged_state_resumes_from_mlflow(tmp_path):
    """Ctrl-C (SIGINT) after a trial finished: exit 130 and a hint with the run's flags. Then Ray's
    saved state and the searcher's database are damaged: --resume says so in a sentence each and
    makes up the round from what MLflow holds, without training the finished trial again."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "s"
    args = [
        *search_only(tmp_path, given_teacher(tmp_path)),
        "--tracking-uri",
        uri,
        "--experiment",
        "e2e-ctrl-c",
    ]
    args += ["--num-samples", "2", "--no-register"]  # the test is about the trials
    args += ["--max-concurrent", "1", "--storage-dir", str(storage)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = [open(tmp_path / "first.out", "w"), open(tmp_path / "first.err", "w")]  # not pipes: never full
    proc = subprocess.Popen(RUN[:-1] + args, cwd=tmp_path, env=env, stdout=logs[0], stderr=logs[1])
    client, finished = MlflowClient(uri), []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not finished:
        exp = client.get_experiment_by_name("e2e-ctrl-c") if (tmp_path / "mlflow.db").exists() else None
        if exp is not None:
            query = f"tags.`{contract.ROLE}` = 'trial' and tags.`{study.TAG_VERDICT}` = '{study.COMPLETE}'"
            finished = client.search_runs([exp.experiment_id], query)
        time.sleep(0.3)
    assert proc.poll() is None, "the first run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    for log in logs:
        log.close()
    out, err = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert "--resume` (the same flags, and --resume)" in err and "--num-samples 2" in err, err[-2000:]
    steps_before = {
        r.info.run_id: sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_psnr_y"))
        for r in finished
    }

    name = (storage / "LATEST").read_text().strip()
    (storage / name / "ray" / "tuner.pkl").write_bytes(b"damaged")
    (storage / "optuna.db").write_bytes(b"not a database")
    out = search(["--resume", *args], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"round 1: Ray's saved state in {storage / name / 'ray'} cannot be read" in out.stdout
    assert f"round 1: the searcher's database {storage / 'optuna.db'} cannot be opened" in out.stdout
    assert not driver_tracebacks(out.stderr), out.stderr[-3000:]
    runs = client.search_runs([exp.experiment_id], f"tags.`{contract.ROLE}` = 'trial'")
    judged = [r for r in runs if r.data.tags.get(study.TAG_VERDICT)]
    assert len(judged) == 2, out.stdout[-4000:]  # the round's number: the kept trials and new ones
    for run_id, steps in steps_before.items():  # the finished trials were not trained again
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_psnr_y")) == steps


def test_a_tracking_server_that_stops_mid_study_is_one_sentence(tmp_path):
    """The server dies once the trial is done: registration, the report or the study's closing
    meets it dead. One sentence saying what the study was doing and how to continue, exit 1."""
    from mlflow.tracking import MlflowClient

    from servers import mlflow_server

    args = [*search_only(tmp_path, given_teacher(tmp_path)), "--experiment", "e2e-dies", "--num-samples", "1"]
    args += ["--storage-dir", str(tmp_path / "s")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = [open(tmp_path / "out", "w"), open(tmp_path / "err", "w")]
    with mlflow_server(tmp_path / "mlflow") as uri:
        proc = subprocess.Popen(
            RUN[:-1] + [*args, "--tracking-uri", uri], cwd=tmp_path, env=env, stdout=logs[0], stderr=logs[1]
        )
        client, judged = MlflowClient(uri), []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not judged:
            exp = client.get_experiment_by_name("e2e-dies")
            if exp is not None:
                judged = client.search_runs([exp.experiment_id], f"tags.`{study.TAG_VERDICT}` != ''")
            time.sleep(0.2)
        assert proc.poll() is None and len(judged) == 1, (tmp_path / "err").read_text()[-3000:]
    proc.wait(timeout=300)  # the server is gone from here on
    for log in logs:
        log.close()
    err = (tmp_path / "err").read_text()
    assert proc.returncode == 1, (tmp_path / "out").read_text()[-3000:] + err[-3000:]
    assert f"the tracking server at {uri} stopped answering; what was logged before is kept" in err, err
    assert "then continue with `python search/run.py" in err and "--resume`" in err
    assert not driver_tracebacks(err), err[-3000:]


def test_a_disk_that_fills_mid_search_is_one_sentence(tmp_path):
    """The search's storage folder on a small disk of its own (a tmpfs in a mount namespace of the
    search's own): once it is full, one sentence saying what filled and how to continue, exit 1."""
    if not pid_namespaces():
        pytest.fail("this test needs `unshare` (root, or user namespaces) to give the search a small disk")
    full = tmp_path / "small-disk"
    full.mkdir()
    args = [
        *search_only(tmp_path),
        "--experiment",
        "e2e-full",
        "--num-samples",
        "2",
        "--storage-dir",
        str(full),
    ]
    args += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    script = f'mount -t tmpfs -o size={SMALL_DISK_KB}k tmpfs {shlex.quote(str(full))} && exec "$@"'
    cmd = ["unshare", "--mount", "sh", "-c", script, "sh", *RUN[:-1], *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    said = re.search(r"error: while (.*), the disk filled up \((.*)\); what was logged before", out.stderr)
    assert said and re.search("No space left on device|database or disk is full", said[2]), out.stderr[-3000:]
    assert "free some space, then continue with `python search/run.py" in out.stderr
    assert not driver_tracebacks(out.stderr), out.stderr[-3000:]
