"""benchmarks/gpu_check.py end to end on the CPU (Triton interpreter, small sizes): the script a GPU
session will run must produce a complete report and pass its own correctness check here first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e  # the GPU check's command line as a process of its own, every part of it
def test_gpu_check_runs_on_the_cpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (tmp_path / "gpu_check.json").exists(), proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed_parts"] == [], proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["device"] == "cpu" and report["interpreted"] and report["sizes"]["timing"]["length"] == 32

    correctness = report["correctness"]
    assert correctness["passed"] and correctness["deterministic"]
    assert len(correctness["cases"]) >= 4
    for case in correctness["cases"]:
        assert case["passed"], case
        assert set(case["errors"]) == {"y", "final_state"} | {
            f"grad_{n}" for n in ("u", "delta", "A", "B", "C", "D")
        }

    timings = report["timing"]["results"]
    keys = {(r["impl"], r["batch"], r["dtype"], r["mode"]) for r in timings}
    assert keys == {
        (impl, batch, dtype, mode)
        for impl in ("triton", "chunked")
        for batch in (1, 2)
        for dtype in ("float32", "bfloat16")
        for mode in ("forward", "forward_backward")
    }
    assert all(r["ms"] > 0 for r in timings)
    assert len(report["timing"]["ratios"]) == 8 and all(
        r["chunked_over_triton"] > 0 for r in report["timing"]["ratios"]
    )

    training = {r["scan"]: r for r in report["training"]["results"]}
    assert set(training) == {"triton", "chunked"}
    assert all(r["ms_per_step"] > 0 and r["last_loss"] > 0 for r in training.values())
