"""Training: loss goes down, distillation loss, exact resume, NaN handling, MLflow logging."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import preset
from trainers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainers.data import PatchSampler
from trainers.train import TrainConfig, TrainingDiverged, distill_loss, train


class Recorder:
    """A tracker that keeps what it is told, and can stop the run like a Ctrl-C at a step."""

    def __init__(self, stop_at: int | None = None, exc=KeyboardInterrupt):
        self.metrics, self.params, self.artifacts = {}, {}, []
        self.stop_at, self.exc = stop_at, exc

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.setdefault(step, {}).update(metrics)
        if self.stop_at is not None and step >= self.stop_at:
            raise self.exc()

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))

    def close(self, status="FINISHED"):
        pass


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        role="teacher",
        model=preset("tiny"),
        batch_size=2,
        patch_size=16,
        iterations=12,
        val_every=6,
        checkpoint_every=3,
        log_every=1,
        val_max_images=1,
        lr=2e-3,
        out_dir=str(tmp_path / "run"),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_distill_loss_formula():
    sr, teacher, hr = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), 3.0)
    assert distill_loss(sr, teacher, hr, 0.25).item() == pytest.approx(0.25 * 1 + 0.75 * 3)
    assert distill_loss(sr, None, hr, 0.25).item() == pytest.approx(3.0)


def test_a_few_steps_lower_the_loss(tmp_path):
    cfg = tiny_cfg(tmp_path, iterations=40, val_every=40, checkpoint_every=40, log_every=1)
    rec = Recorder()
    result = train(cfg, rec)
    losses = [rec.metrics[s]["loss"] for s in sorted(rec.metrics) if "loss" in rec.metrics[s]]
    assert len(losses) == 40
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), (losses[:10], losses[-10:])
    assert result.step == 40 and result.val_psnr_y > 0 and result.patches_per_s > 0
    assert not result.energy.available and result.energy.energy_j is None  # no sensor on the CPU
    assert {"val_psnr_y", "val_ssim_y", "params", "flops_g", "patches_per_s"} <= set(rec.metrics[40])
    assert rec.params["model"]["embed_dim"] == 8 and rec.params["params"] > 0
    assert any(a == "samples" for _, a in rec.artifacts) and any(a == "checkpoint" for _, a in rec.artifacts)


def test_student_distills_from_a_teacher_and_reports_its_cost(tmp_path):
    teacher = train(tiny_cfg(tmp_path / "t", iterations=3, val_every=3), Recorder())
    rec = Recorder()
    result = train(
        tiny_cfg(
            tmp_path / "s", role="student", teacher=teacher.checkpoint, alpha=0.7, iterations=4, val_every=4
        ),
        rec,
    )
    assert 0 < result.teacher_share < 1
    assert rec.metrics[4]["teacher_share"] == result.teacher_share
    with pytest.raises(ValueError, match="needs a teacher"):
        train(tiny_cfg(tmp_path / "x", role="student", alpha=0.5), Recorder())


def test_a_student_can_start_from_its_teachers_weights(tmp_path):
    """--init teacher: the student's first weights are the ones model.inherit picks from the
    teacher (here a learning rate too small to move them in one step shows them); init is a param."""
    from model import build_model
    from model.inherit import DEFAULT_CRITERION, inherit
    from model.mambalitesr import load_model
    from trainers.data import PatchSampler, load_sets

    teacher_cfg = preset("tiny", embed_dim=12, rank=4)
    teacher = train(tiny_cfg(tmp_path / "t", model=teacher_cfg, iterations=2, val_every=2), Recorder())
    student_cfg = preset("tiny", embed_dim=8, rank=2)
    rec = Recorder()
    kw = dict(role="student", model=student_cfg, teacher=teacher.checkpoint, alpha=0.0, iterations=1)
    result = train(tiny_cfg(tmp_path / "s", init="teacher", lr=1e-12, val_every=1, **kw), rec)
    assert rec.params["init"] == "teacher" and rec.params["init_criterion"] == DEFAULT_CRITERION
    assert result.teacher_share is None  # at alpha 0 the teacher gives the weights and never runs again
    # the default criterion measures the teacher on the run's first training batch
    cfg = tiny_cfg(tmp_path / "s", init="teacher", lr=1e-12, val_every=1, **kw)
    sampler = PatchSampler(load_sets(list(cfg.train_data), "train", 4), cfg.patch_size, 4, seed=cfg.seed)
    calibration = sampler.batch(0, cfg.batch_size)[0]
    expected = inherit(load_model(teacher.checkpoint), student_cfg, DEFAULT_CRITERION, calibration, seed=0)
    got = weights(tmp_path / "s" / "run" / "last.pt")
    assert all(torch.allclose(got[k], v, atol=1e-9) for k, v in expected.state_dict().items())
    scratch = build_model(student_cfg).state_dict()
    assert not torch.allclose(got["conv_first.weight"], scratch["conv_first.weight"], atol=1e-3)
    with pytest.raises(ValueError, match="init 'teacher' is for a student"):
        tiny_cfg(tmp_path, init="teacher")
    with pytest.raises(ValueError, match="--init teacher needs the teacher checkpoint"):
        train(tiny_cfg(tmp_path / "x", role="student", alpha=0.0, init="teacher"), Recorder())


def test_a_student_wider_than_its_teacher_is_refused_with_exit_2(tmp_path, capsys):
    from trainers import train as train_module

    teacher = train(tiny_cfg(tmp_path / "t", iterations=1, val_every=1), Recorder())  # embed dim 8
    argv = ["--role", "student", "--preset", "tiny", "--embed-dim", "12", "--init", "teacher"]
    argv += ["--teacher", teacher.checkpoint, "--batch-size", "2", "--patch-size", "16", "--iterations", "1"]
    argv += ["--val-max-images", "1", "--out-dir", str(tmp_path / "s")]
    assert train_module.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: --init teacher: the student's embed dim is 12, wider than the teacher's 8" in err
    assert "Traceback" not in err
    # --alpha 0 with a teacher is refused only when the teacher is not used at all
    assert train_module.main([*argv[:6], "--teacher", teacher.checkpoint, "--alpha", "0"]) == 2
    assert "drop --teacher, give alpha > 0 or --init teacher" in capsys.readouterr().err


def test_a_student_that_inherits_takes_its_teachers_topology_unless_told_to_keep_its_own(tmp_path, capsys):
    """DVMSR's topology (a LayerNorm after the first conv, no per-block residual) goes to a student
    that inherits: in its checkpoint and its params, and a resumed run agrees with it. --own-topology
    keeps the preset's; it means nothing without --init teacher."""
    from trainers import train as train_module

    dvmsr_like = preset("tiny", embed_dim=12, embed_norm=True, block_residual=False)
    teacher = train(tiny_cfg(tmp_path / "t", model=dvmsr_like, iterations=1, val_every=1), Recorder())
    kw = dict(role="student", model=preset("tiny"), teacher=teacher.checkpoint, alpha=0.5, init="teacher")
    rec = Recorder()
    cfg = tiny_cfg(tmp_path / "s", iterations=2, val_every=1, checkpoint_every=1, **kw)
    train(cfg, rec)
    saved = load_checkpoint(tmp_path / "s" / "run" / "last.pt")["model_config"]
    assert (saved["embed_norm"], saved["block_residual"]) == (True, False)
    assert rec.params["model"]["embed_norm"] is True and rec.params["init_topology"] == "teacher"
    assert train(cfg, Recorder(), resume=True).step == 2  # its saved settings agree with a rerun's
    own = tiny_cfg(tmp_path / "o", iterations=1, val_every=1, init_topology="own", **kw)
    train(own, Recorder())
    saved = load_checkpoint(tmp_path / "o" / "run" / "last.pt")["model_config"]
    assert (saved["embed_norm"], saved["block_residual"]) == (False, True)
    with pytest.raises(ValueError, match="init_topology must be one of"):
        tiny_cfg(tmp_path, init_topology="mine")
    argv = ["--role", "student", "--preset", "tiny", "--teacher", teacher.checkpoint, "--own-topology"]
    assert train_module.main(argv) == 2
    assert "--own-topology is for a student that inherits" in capsys.readouterr().err


def weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_resume_gives_the_same_weights(tmp_path, exc):
    straight = train(tiny_cfg(tmp_path / "a"), Recorder())
    cfg = tiny_cfg(tmp_path / "b")
    with pytest.raises(exc):
        train(cfg, Recorder(stop_at=7, exc=exc))  # Ctrl-C saves step 7; a crash leaves step 6
    state = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert state["step"] == (7 if exc is KeyboardInterrupt else 6)
    resumed = train(cfg, Recorder(), resume=True)
    assert resumed.step == straight.step == 12
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the compute spent counts the interrupted part too: what the checkpoint carried, plus the rest
    assert 0 < state["metrics"]["cpu_s"] < resumed.cpu_s and straight.cpu_s > 0
    assert (
        state["metrics"]["cpu_s"] < load_checkpoint(resumed.checkpoint)["metrics"]["cpu_s"] <= resumed.cpu_s
    )


def test_a_resume_with_nothing_left_gives_its_new_run_the_figures(tmp_path):
    """Killed after its last checkpoint (a finalization that ended as its driver died): the resumed
    call trains no step, and the run it logs to still gets the quality the weights reached."""
    cfg = tiny_cfg(tmp_path)
    first = Recorder()
    done = train(cfg, first)
    again = Recorder()
    resumed = train(cfg, again, resume=True)
    assert resumed.step == done.step and resumed.val_psnr_y == done.val_psnr_y
    logged = again.metrics[done.step]
    assert logged["val_psnr_y"] == first.metrics[done.step]["val_psnr_y"] == done.val_psnr_y
    assert logged["val_ssim_y"] == done.val_ssim_y and logged["cpu_s"] > 0
    assert set(again.metrics) == {done.step}  # nothing trained, nothing else logged


@pytest.mark.e2e  # a training command line as a process of its own, killed and resumed
def test_resume_after_kill_9(tmp_path):
    """A real process killed mid-run, resumed by the CLI, ends with the uninterrupted weights."""
    args = [
        "--role",
        "teacher",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--patch-size",
        "16",
        "--iterations",
        "40",
        "--val-every",
        "40",
        "--checkpoint-every",
        "2",
        "--val-max-images",
        "1",
        "--lr",
        "2e-3",
        "--seed",
        "5",
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    subprocess.run(
        [sys.executable, "-m", "trainers.train", *args, "--out-dir", str(out_a)],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainers.train", *args, "--out-dir", str(out_b)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ckpt = out_b / "last.pt"
        if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out_b / "last.pt")["step"]
    assert 6 <= killed_at < 40, killed_at
    subprocess.run(
        [sys.executable, "-m", "trainers.train", *args, "--out-dir", str(out_b), "--resume"],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    a, b = weights(out_a / "last.pt"), weights(out_b / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_can_start_from_the_weights_of_another_run_of_the_same_network(tmp_path):
    """init_weights: what a search's finalization does with its trial's checkpoint."""
    from dataclasses import replace

    first = train(tiny_cfg(tmp_path / "a", iterations=6), Recorder())
    # a learning rate too small to move a weight: the run ends with the weights it started from
    still = dict(iterations=3, val_every=3, lr=1e-30)
    went_on = train(tiny_cfg(tmp_path / "b", init_weights=first.checkpoint, **still), Recorder())
    a, b = weights(first.checkpoint), weights(went_on.checkpoint)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)
    assert went_on.val_psnr_y == pytest.approx(first.val_psnr_y, abs=1e-4)
    fresh = weights(train(tiny_cfg(tmp_path / "c", **still), Recorder()).checkpoint)  # from random
    assert not all(torch.allclose(a[k], fresh[k], rtol=0, atol=1e-6) for k in a)
    other = replace(preset("tiny"), embed_dim=12)
    with pytest.raises(CheckpointError, match=r"holds another network \(it differs in \['embed_dim'\]\)"):
        train(tiny_cfg(tmp_path / "d", model=other, init_weights=first.checkpoint, **still), Recorder())


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path, iterations=3, val_every=3)
    train(cfg, Recorder())
    ckpt = tmp_path / "run" / "last.pt"
    with pytest.raises(CheckpointError, match="different settings.*alpha|different settings.*lr"):
        train(tiny_cfg(tmp_path, iterations=3, val_every=3, lr=1e-4), Recorder(), resume=True)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(cfg, Recorder(), resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_cfg(tmp_path / "fresh"), Recorder(), resume=True)


def partial_files(root) -> list:
    return sorted(str(p) for p in Path(root).rglob("*.partial"))


@pytest.mark.parametrize("failing", ["fsync", "replace"])  # while the data is written; at the rename
def test_a_full_disk_leaves_the_old_checkpoint_and_no_partial_file(tmp_path, monkeypatch, failing):
    path = save_checkpoint({"model_config": {}, "model": {}, "step": 1}, tmp_path / "c.pt")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, full)
    with pytest.raises(CheckpointError, match=f"no space left to write the checkpoint {path};.*--out-dir"):
        save_checkpoint({"model_config": {}, "model": {}, "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_checkpoint_that_is_not_ours_or_lacks_a_key_or_cannot_be_written_is_named(tmp_path):
    import torch

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)  # another program's checkpoint
    with pytest.raises(CheckpointError, match=f"{other} is not a mambalitesr-checkpoint-v1 checkpoint"):
        load_checkpoint(other)
    path = save_checkpoint({"model_config": {}, "step": 3}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"lacks \['model'\]; it cannot be resumed"):
        load_checkpoint(path)
    blocked = tmp_path / "file"  # a file where the checkpoint's folder should be
    blocked.write_text("")
    with pytest.raises(
        CheckpointError, match=f"cannot write the checkpoint {blocked}/c.pt: .*writable --out-dir"
    ):
        save_checkpoint({"model_config": {}, "model": {}, "step": 1}, blocked / "c.pt")


def test_a_full_disk_during_training_is_one_sentence(tmp_path, monkeypatch, capsys):
    from trainers import train as train_module

    out = tmp_path / "run"
    real_replace = os.replace
    calls = []

    def full_on_the_second(src, dst):  # the first checkpoint lands, the second finds the disk full
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_on_the_second)
    argv = ["--role", "teacher", "--preset", "tiny", "--batch-size", "2", "--patch-size", "16"]
    argv += ["--iterations", "6", "--val-every", "6", "--checkpoint-every", "2", "--val-max-images", "1"]
    assert train_module.main([*argv, "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: no space left to write the checkpoint {out / 'last.pt'}; "
        "free some space on that disk or choose another --out-dir"
    )
    assert "Traceback" not in err
    assert partial_files(tmp_path) == [] and load_checkpoint(out / "last.pt")["step"] == 2


def test_a_validation_image_too_small_to_measure_is_named_before_training(tmp_path, capsys):
    import numpy as np

    from trainers import train as train_module

    from conftest import write_png

    val = tmp_path / "val"
    write_png(val / "big.png", np.full((40, 40, 3), 128, np.uint8))
    write_png(val / "thumb.png", np.full((16, 24, 3), 128, np.uint8))  # 16 rows: 8 after the x4 border
    out = tmp_path / "run"
    argv = ["--role", "teacher", "--preset", "tiny", "--batch-size", "2", "--patch-size", "16"]
    argv += ["--iterations", "4", "--val-data", str(val), "--out-dir", str(out)]
    assert train_module.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: validation image thumb is 24x16: too small to be measured at x4 (SSIM needs 11x11 "
        "pixels once a 4-pixel border is cropped, so at least 19x19); remove it from the validation set"
    )
    assert not (out / "last.pt").exists()  # refused when the set was loaded, before any step


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = PatchSampler.batch

    def poisoned(self, step, batch_size):
        lr, hr = real(self, step, batch_size)
        return (lr * float("nan"), hr) if step >= 4 else (lr, hr)

    monkeypatch.setattr(PatchSampler, "batch", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 4.*last.pt"):
        train(tiny_cfg(tmp_path), Recorder())
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        TrainConfig(alpha=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown training config key"):
        TrainConfig.from_dict({"learning_rate": 1})
    cfg = TrainConfig.from_dict(TrainConfig(train_data=("x",)).to_dict())
    assert cfg == TrainConfig(train_data=("x",))


def test_mlflow_tracker_logs_params_metrics_and_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    from trainers.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri, "test-exp", run_name="t", tags={"role": "teacher"})
    train(tiny_cfg(tmp_path, iterations=3, val_every=3), tracker)
    tracker.close()
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["role"] == "teacher"
    assert run.data.params["model.embed_dim"] == "8" and "val_psnr_y" in run.data.metrics
    # which scan form ran: "auto" is the fused CPU kernel here (it builds on CI and dev machines)
    assert run.data.params["model.scan"] == "auto" and run.data.params["scan_form"] == "fused"
    names = {f.path for f in MlflowClient(uri).list_artifacts(tracker.run_id)}
    assert {"checkpoint", "samples"} <= names


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which Python writes by default but JSON has not."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_json_report_is_json_when_a_figure_is_nan(tmp_path, capsys):
    """Resumed with no steps left, a run has no throughput (NaN): --json and stdout say null."""
    from trainers import train as train_module

    argv = ["--role", "teacher", "--preset", "tiny", "--batch-size", "2", "--patch-size", "16"]
    argv += ["--iterations", "2", "--val-every", "2", "--val-max-images", "1", "--out-dir", str(tmp_path)]
    assert train_module.main(argv) == 0
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert train_module.main([*argv, "--resume", "--json", str(out)]) == 0
    report = strict_json(out.read_text())
    assert report["step"] == 2 and report["patches_per_s"] is None and report["teacher_share"] is None
    assert report["val_psnr_y"] > 0 and report["energy"]["energy_j"] is None
    stdout = capsys.readouterr().out
    assert strict_json(stdout[stdout.rindex("\n{\n") + 1 :]) == report


def test_finite_or_none_reaches_every_depth():
    from trainers.metrics import finite_or_none

    value = {"a": math.inf, "b": [1.5, -math.inf, {"c": math.nan}], "d": (2, "x"), "e": None, "f": True}
    assert finite_or_none(value) == {
        "a": None,
        "b": [1.5, None, {"c": None}],
        "d": [2, "x"],
        "e": None,
        "f": True,
    }


def test_validation_measures_what_the_evaluation_cli_measures(tmp_path):
    """One inference and one metric loop: validate() is evaluate_set() of the checkpoint's upscaler."""
    import numpy as np

    from model import build_model
    from trainers.data import load_sets
    from trainers.evaluate import checkpoint_upscaler, evaluate_set
    from trainers.train import validate

    torch.manual_seed(0)
    net = build_model("tiny")
    torch.save({"model_config": net.cfg.__dict__, "model": net.state_dict()}, tmp_path / "tiny.pt")
    pairs = load_sets([], "val", 4)  # RGB and grayscale (camera) images
    net.train()
    got = validate(net, pairs, torch.device("cpu"))
    assert net.training  # put back as it was
    upscale, scale = checkpoint_upscaler(str(tmp_path / "tiny.pt"))
    want = evaluate_set(upscale, pairs, scale, "val")
    assert got == {"val_psnr_y": want.psnr_y, "val_ssim_y": want.ssim_y}
    assert np.isfinite(got["val_psnr_y"]) and 0 < got["val_ssim_y"] < 1
