"""Search efficiency on the smoke problem: hypervolume of (PSNR up, FLOPs down) against trials for
TPE, NSGA-II and random search, and the compute the early-stopping rule saves against MOASHA's
rule and no stopping (the SR check of what benchmarks/bench_lcbench.py found on LCBench).

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


# the early_stopping block of each scheduler: ours on its defaults, MOASHA's rank rule, none
SCHEDULERS = {
    "pareto": "early_stopping:\n  enabled: true\n",
    "moasha": "early_stopping:\n  enabled: true\n  rule: rank\n  min_rung: 1\n  rung_factor: 3\n  eta: 3\n",
    "none": "early_stopping:\n  enabled: false\n",
}
VARIANTS = [("tpe", "pareto"), ("random", "pareto"), ("tpe", "moasha"), ("tpe", "none")]


def run_study(
    out: Path,
    searcher: str,
    seed: int,
    n: int,
    scheduler: str,
    iterations: int,
    startup: int | None = None,
) -> dict:
    tag = f"{searcher}-s{seed}-{scheduler}"
    cfg = out / f"{tag}.yaml"
    smoke = (ROOT / "search" / "configs" / "smoke.yaml").read_text()
    smoke = smoke.replace(
        "  iterations: 8\n  val_every: 4\n",
        f"  iterations: {iterations}\n  val_every: {iterations // 4}\n",
        1,
    )
    block = smoke[smoke.index("early_stopping:\n") : smoke.index("registry:\n")]
    smoke = smoke.replace(block, SCHEDULERS[scheduler])
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
    curve, by_steps, steps = [], [], 0
    for k in range(1, len(rows) + 1):
        pts = [(r["val_psnr_y"], r["cost"]) for r in rows[:k] if r["status"] == "complete"]
        curve.append(hypervolume_2d(pts, REFERENCE))
        steps += rows[k - 1]["step"]
        by_steps.append((steps, curve[-1]))
    wall = float((out / f"{tag}.wall").read_text()) if (out / f"{tag}.wall").exists() else float("nan")
    return {
        "tag": tag,
        "wall_s": wall,
        "curve": curve,
        "by_steps": by_steps,  # (cumulative training steps, HV) in start order
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
        for searcher, scheduler in VARIANTS:
            tag = f"{searcher}-s{seed}-{scheduler}"
            if args.report_only or (out / f"{tag}.json").exists():
                results.append(analyse(out, tag))
            else:
                results.append(
                    run_study(
                        out, searcher, seed, args.num_samples, scheduler, args.iterations, args.startup_trials
                    )
                )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"reference point: PSNR-Y {REFERENCE[0]} dB, {REFERENCE[1]} GFLOPs; {args.num_samples} trials, "
        f"{args.iterations} steps each, seeds {args.seeds}"
    )
    groups: dict[str, list[dict]] = {}
    for r in results:
        searcher, scheduler = r["tag"].split("-s")[0], r["tag"].rsplit("-", 1)[1]
        groups.setdefault(f"{searcher}, {scheduler}", []).append(r)
    half = args.num_samples // 2
    # equal compute: every run at the steps the cheapest group spent on average
    equal = min(statistics.mean(r["steps"] for r in rs) for rs in groups.values())
    hv_cols = f"{'HV@' + str(half):>12s} {'HV@' + str(args.num_samples):>18s} {f'HV@{equal:.0f} steps':>16s}"
    print(f"{'searcher, scheduler':24s} {hv_cols} {'steps':>6s} {'wall s':>7s}")
    for name, rs in groups.items():
        hv_half = [r["curve"][half - 1] for r in rs]
        hv_end = [r["curve"][-1] for r in rs]
        hv_equal = [max((hv for st, hv in r["by_steps"] if st <= equal), default=0.0) for r in rs]
        se = lambda xs: statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0  # noqa: E731
        print(
            f"{name:24s} {statistics.mean(hv_half):12.5f} {statistics.mean(hv_end):10.5f}±{se(hv_end):.5f} "
            f"{statistics.mean(hv_equal):10.5f}±{se(hv_equal):.5f} "
            f"{statistics.mean(r['steps'] for r in rs):6.0f} {statistics.mean(r['wall_s'] for r in rs):7.1f}"
        )


if __name__ == "__main__":
    main()
