"""The whole loop on this machine: stage wall times, and the cost model's error per round.

    python -m benchmarks.bench_loop [--rounds 2] [--num-samples 4] [--skip-smoke]

1. README's main job, ``search/run.py --smoke-test`` (search -> registration -> local edge agent on
   the CPU -> selection), in a temp dir with MLflow in SQLite: its stage times as it logs them.
2. The learning loop as tests/test_loop_e2e.py runs it: ``--rounds 2 --objective edge_energy``
   with the agent's power read from a FAKE INA3221 sysfs tree (tests/fakes.py) whose power follows
   this machine's CPU load (3 W idle + 4 W x busy share). Per round: how many measurements the cost
   model had, the error of the predictions that steered the round's trials on the round's new
   measurements (held out), and the refitted model's leave-one-out error. The sensor is fake, so
   these errors say how the loop behaves, not how well energy on a Jetson is predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_search(args: list[str], cwd: Path) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(ROOT / "search" / "run.py"), *args, "--json", str(cwd / "r.json")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"search failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads((cwd / "r.json").read_text()), wall


def smoke(tmp: Path) -> None:
    report, wall = run_search(["--smoke-test"], tmp)
    print("\n| stage | seconds |\n| --- | --- |")
    for key, value in report["timings_s"].items():
        print(f"| {key} | {value:.1f} |")
    print(f"| **whole command (incl. Ray and MLflow start-up)** | **{wall:.1f}** |")
    ch = report["champion"] or {}
    print(f"champion: v{ch.get('champion_version')} ({ch.get('cost')})")


def rounds(tmp: Path, k: int, n: int) -> None:
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(ROOT / "tests"))
    from test_loop_e2e import _busy_fraction

    from fakes import FakeIna3221

    tree = FakeIna3221(tmp / "root", _busy_fraction(), rate_hz=50.0)
    cfg = yaml.safe_load((ROOT / "search" / "configs" / "smoke.yaml").read_text())
    cfg["loop"]["agent_args"] += ["--power", "ina3221", "--power-root", str(tree.root)]
    cfg["early_stopping"]["enabled"] = False  # as the test: every trial complete, a deterministic front
    (tmp / "loop.yaml").write_text(yaml.safe_dump(cfg))
    try:
        report, wall = run_search(
            ["--config", str(tmp / "loop.yaml"), "--rounds", str(k), "--objective", "edge_energy"]
            + ["--num-samples", str(n)],
            tmp,
        )
    finally:
        tree.close()
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    hist = {
        key: {m.step: m.value for m in client.get_metric_history(report["study_run_id"], key)}
        for key in ("costmodel_points", "costmodel_round_mae", "costmodel_loo_mae")
    }
    energies = [round(r["cost"], 2) for r in report["trials"] if r["cost_source"] == "measured"]
    print(f"\n{k} rounds x {n} trials, wall {wall:.1f} s; measured energies (mJ/image): {sorted(energies)}")
    print(
        "| round | measurements after it | held-out MAE of the round's predictions | LOO MAE of the refit |"
    )
    print("| --- | --- | --- | --- |")
    for r in range(1, k + 1):
        cells = [hist[key].get(r) for key in ("costmodel_points", "costmodel_round_mae", "costmodel_loo_mae")]
        print(f"| {r} | " + " | ".join("-" if c is None else f"{c:.4g}" for c in cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--skip-smoke", action="store_true")
    args = ap.parse_args()
    if not args.skip_smoke:
        with tempfile.TemporaryDirectory() as d:
            smoke(Path(d))
    with tempfile.TemporaryDirectory() as d:
        rounds(Path(d), args.rounds, args.num_samples)


if __name__ == "__main__":
    main()
