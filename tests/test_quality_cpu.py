"""The CPU budget run: its verdict module, and the script end to end on tiny data."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import quality_report
from model import build_model
from trainers.evaluate import main as evaluate_main

from conftest import ROOT, write_png


def _folder(root: Path, name: str, n: int, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = size
        hr = (rng.random((h, w, 3)) * 60 + np.linspace(0, 180, w)[None, :, None]).astype(np.uint8)
        write_png(root / name / "HR" / f"img_{i}.png", hr)
    return root / name


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for i, name in enumerate(("Set5", "Set14", "BSD100")):
        _folder(root, name, 2, (64, 48), seed=i)
    return root


def _evaluation(bench: Path, tmp: Path) -> Path:
    out = tmp / "bicubic.json"
    sets = [str(bench / s) for s in ("Set5", "Set14", "BSD100")]
    assert evaluate_main(["--model", "bicubic", "--data", *sets, "--json", str(out)]) == 0
    return out


def _shifted(path: Path, tmp: Path, shifts: dict[str, float]) -> Path:
    data = json.loads(path.read_text())
    for s in data["sets"]:
        s["psnr_y"] += shifts.get(s["name"], 0.0)
    out = tmp / "model.json"
    out.write_text(json.dumps(data))
    return out


def test_the_target_is_met_only_when_every_set_clears_the_margin(bench, tmp_path, capsys):
    base = _evaluation(bench, tmp_path)
    good = _shifted(base, tmp_path, {"Set5": 0.5, "Set14": 0.31, "BSD100": 0.3})
    summary_path = tmp_path / "summary.json"
    args = ["--baseline", str(base), "--margin-db", "0.3", "--out", str(summary_path)]
    assert quality_report.main(["--model", str(good), *args]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["met"] is True
    assert summary["sets"]["Set14"]["margin_db"] == pytest.approx(0.31, abs=1e-3)

    short = _shifted(base, tmp_path, {"Set5": 0.5, "Set14": 0.29, "BSD100": 0.4})
    assert quality_report.main(["--model", str(short), *args]) == quality_report.MISSED
    summary = json.loads(summary_path.read_text())
    assert summary["met"] is False
    assert [n for n, s in summary["sets"].items() if not s["met"]] == ["Set14"]
    assert "MISSED" in capsys.readouterr().out


def test_unreadable_or_mismatched_inputs_are_errors_that_say_so(bench, tmp_path, capsys):
    base = _evaluation(bench, tmp_path)
    partial = json.loads(base.read_text())
    partial["sets"] = partial["sets"][:2]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(partial))
    assert quality_report.main(["--model", str(fewer), "--baseline", str(base)]) == 2
    assert "same sets" in capsys.readouterr().err

    broken = tmp_path / "broken.json"
    broken.write_text('{"sets": [')
    assert quality_report.main(["--model", str(broken), "--baseline", str(base)]) == 2
    assert "not a `trainers.evaluate --json` file" in capsys.readouterr().err
    assert quality_report.main(["--model", str(tmp_path / "absent.json"), "--baseline", str(base)]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.e2e  # the script's stages as subprocesses
def test_the_script_trains_exports_and_judges_on_tiny_data(bench, tmp_path):
    torch.manual_seed(0)
    teacher = build_model("tiny")
    teacher_path = tmp_path / "teacher.pt"
    torch.save({"model_config": teacher.cfg.__dict__, "model": teacher.state_dict()}, teacher_path)
    train = _folder(tmp_path, "train", 2, (96, 96), seed=7)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "ITERATIONS": "2",
        "BATCH": "2",
        "PATCH": "8",
        "PRESET": "tiny",  # the script's path is the same for every preset; tiny exports fastest
        "TEACHER": str(teacher_path),
        "TRAIN_DATA": str(train),
        "BENCH": str(bench),
    }
    proc = subprocess.run(
        ["bash", "benchmarks/quality_cpu.sh", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    # two steps of a student stay far below bicubic: the run works and reports the miss
    assert proc.returncode == quality_report.MISSED, proc.stdout + proc.stderr
    assert (out / "student.onnx").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["sets"]) == ["BSD100", "Set14", "Set5"]
    assert summary["met"] is False
    assert set(summary["timings_s"]) == {"train", "export", "evaluate", "bicubic", "total"}
    exported = json.loads((out / "export.json").read_text())
    assert exported["input_shape"] == [1, 3, 64, 64]


def test_the_script_refuses_a_missing_data_folder(tmp_path):
    env = {**os.environ, "TRAIN_DATA": str(tmp_path / "nowhere")}
    proc = subprocess.run(
        ["bash", "benchmarks/quality_cpu.sh", str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "nowhere not found" in proc.stderr
    assert not (tmp_path / "run").exists()
