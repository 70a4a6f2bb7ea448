"""Search efficiency on the smoke problem: hypervolume of (PSNR up, FLOPs down) against trials for
TPE, NSGA-II and random search, and the compute the early-stopping rule saves.

    python -m benchmarks.bench_search [--seeds 0 1 2] [--num-samples 8] [--out outputs/bench_search]

Each study is a real `search/run.py --smoke-test` run (local Ray, MLflow in SQLite) with a longer
training budget than the smoke default. The hypervolume uses one fixed reference point for every
run (printed), counting fully trained trials only, in the order they started.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from search.pareto import hypervolume_2d

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (12.0, 0.12)  # (PSNR-Y dB, GFLOPs): below / above anything the smoke space produces


def run_study(
    out: Path,
    searcher: str,
    seed: int,
    n: int,
    early_stopping: bool,
    iterations: int,
    startup: int | None = None,
) -> dict:
    tag = f"{searcher}-s{seed}-{'es' if early_stopping else 'noes'}"
    cfg = out / f"{tag}.yaml"
    smoke = (ROOT / "search" / "configs" / "smoke.yaml").read_text()
    smoke = smoke.replace(
        "  iterations: 8\n  val_every: 4\n",
        f"  iterations: {iterations}\n  val_every: {iterations // 4}\n",
        1,
    )
    smoke = smoke.replace(
        "early_stopping:\n  enabled: true", f"early_stopping:\n  enabled: {str(early_stopping).lower()}"
    )
    cfg.write_text(smoke)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    cmd = [
        sys.executable,
        str(ROOT / "search" / "run.py"),
        "--config",
        str(cfg),
        "--searcher",
        searcher,
        "--seed",
        str(seed),
        "--num-samples",
        str(n),
        "--experiment",
        tag,
        "--tracking-uri",
        uri,
        "--storage-dir",
        str(out / tag),
        "--json",
        str(out / f"{tag}.json"),
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (out / f"{tag}.wall").write_text(f"{wall:.1f}")
    return analyse(out, tag)


def analyse(out: Path, tag: str) -> dict:
    """Hypervolume after each trial (in start order), steps trained and wall time of one study."""
    from mlflow.tracking import MlflowClient

    report = json.loads((out / f"{tag}.json").read_text())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    rows = sorted(report["trials"], key=lambda r: client.get_run(r["run_id"]).info.start_time)
    curve = []
    for k in range(1, len(rows) + 1):
        pts = [(r["val_psnr_y"], r["cost"]) for r in rows[:k] if r["status"] == "complete"]
        curve.append(hypervolume_2d(pts, REFERENCE))
    wall = float((out / f"{tag}.wall").read_text()) if (out / f"{tag}.wall").exists() else float("nan")
    return {
        "tag": tag,
        "wall_s": wall,
        "curve": curve,
        "steps": sum(r["step"] for r in rows),
        "summary": report["summary"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--iterations", type=int, default=16)
    p.add_argument("--out", default="outputs/bench_search")
    p.add_argument("--startup-trials", type=int, help="random trials before TPE / NSGA-II population")
    p.add_argument("--report-only", action="store_true", help="analyse the studies already in --out")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for searcher, es in (("tpe", True), ("nsga2", True), ("random", True), ("tpe", False)):
            tag = f"{searcher}-s{seed}-{'es' if es else 'noes'}"
            if args.report_only:
                results.append(analyse(out, tag))
            else:
                results.append(
                    run_study(out, searcher, seed, args.num_samples, es, args.iterations, args.startup_trials)
                )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"reference point: PSNR-Y {REFERENCE[0]} dB, {REFERENCE[1]} GFLOPs; {args.num_samples} trials, "
        f"{args.iterations} steps each, seeds {args.seeds}"
    )
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(
            r["tag"].split("-s")[0] + ("" if r["tag"].endswith("-es") else " (no early stop)"), []
        ).append(r)
    half = args.num_samples // 2
    hv_cols = f"{'HV@' + str(half):>12s} {'HV@' + str(args.num_samples):>12s}"
    print(f"{'searcher':24s} {hv_cols} {'steps':>6s} {'wall s':>7s}")
    for name, rs in groups.items():
        hv_half = [r["curve"][half - 1] for r in rs]
        hv_end = [r["curve"][-1] for r in rs]
        sd = statistics.stdev(hv_end) if len(hv_end) > 1 else 0.0
        print(
            f"{name:24s} {statistics.mean(hv_half):12.5f} {statistics.mean(hv_end):8.5f}±{sd:.5f} "
            f"{statistics.mean(r['steps'] for r in rs):6.0f} {statistics.mean(r['wall_s'] for r in rs):7.1f}"
        )


if __name__ == "__main__":
    main()
