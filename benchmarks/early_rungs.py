"""Do early validations predict the last one? Spearman's rank correlation, over random draws of the
search space, of each trial's validation PSNR-Y at validation k with its final one: students that
start from their teacher against students from scratch, at the same short budget.

    python -m benchmarks.early_rungs --out runs/rungs --teacher dvmsr:PATH/team07_DVMSR.pth \
        --train-data PHOTOS/SunHays80 --draws 12 --steps 160 --val-every 40

The draws are the search's own: Optuna's random sampler over a search config's space (embed dim,
rank, alpha; its base model's other dimensions), the defaults' unless ``--config`` names a file,
seeded by ``--seed``. Every arm trains every
draw with the recipe of benchmarks/inherit_curve.py and is validated on the held-out split of the
training photos (the last ``--val-images`` by name). The early-stopping rule decides at validations
``min_rung``, ``min_rung + 1``, ...: a rung it may trust is one whose ranking agrees with the final
one. Each finished run is appended to ``OUT/runs.jsonl`` at once, so an interrupted benchmark
continues where it stopped when run again with the same arguments; ``OUT/summary.json`` holds the
correlations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from edge_agent import argtypes

ARMS = ("scratch", "teacher")


def draws(cfg, n: int, seed: int) -> list[dict]:
    """``n`` knob settings drawn from ``cfg``'s space as the search's random searcher draws them."""
    import optuna

    from search.space import define_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        define_space(trial, cfg)
        out.append(dict(trial.params))
        study.tell(trial, 0.0)
    return out


def spearman_by_rung(curves: list[list[float]]) -> list[float]:
    """rho of the values at each validation with the last one, across curves (all of one length)."""
    from scipy.stats import spearmanr

    n = len(curves[0])
    return [float(spearmanr([c[k] for c in curves], [c[-1] for c in curves])[0]) for k in range(n - 1)]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.inherit_curve import run_arm, split
    from model.inherit import DEFAULT_CRITERION

    p = argparse.ArgumentParser(prog="python -m benchmarks.early_rungs", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--teacher", required=True, help="teacher checkpoint, or dvmsr / dvmsr:PATH")
    p.add_argument("--config", help="a search config whose space is drawn from (default: the defaults)")
    p.add_argument("--train-data", required=True, type=Path, help="a folder of HR photos")
    p.add_argument("--val-images", type=argtypes.positive_int, default=10)
    p.add_argument("--draws", type=argtypes.positive_int, default=12)
    p.add_argument("--seed", type=argtypes.nonnegative_int, default=0)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--steps", type=argtypes.positive_int, default=160)
    p.add_argument("--val-every", type=argtypes.positive_int, default=40)
    p.add_argument("--lr", type=argtypes.positive_float, default=2e-3)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=16)
    p.add_argument("--patch-size", type=argtypes.positive_int, default=32)
    p.add_argument(
        "--topology", choices=("default", "paper", "teacher"), default="default", help="as in inherit_curve"
    )
    args = p.parse_args(argv)
    if args.steps // args.val_every < 2:
        p.error("--steps must hold at least two validations (--val-every)")
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir, val_dir = split(args.train_data, args.val_images, args.out / "data")
    log = args.out / "runs.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():  # a line cut short by a kill is not a run
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[(r["draw"], r["arm"])] = r
    from search.config import load_config

    cfg = load_config(args.config)
    knobs = draws(cfg, args.draws, args.seed)
    for i, k in enumerate(knobs):
        for arm in args.arms:
            if (i, arm) in done:
                continue
            ns = SimpleNamespace(
                preset=cfg.base_model,
                embed_dim=k["embed_dim"],
                rank=k["rank"],
                alpha=k["alpha"],
                topology=args.topology,
                teacher=args.teacher,
                lr=args.lr,
                batch_size=args.batch_size,
                patch_size=args.patch_size,
                steps=args.steps,
                val_every=args.val_every,
                seed=args.seed,
                out=str(args.out / f"d{i:02d}"),
                test_data=[],
            )
            arm_spec = f"teacher:{DEFAULT_CRITERION}" if arm == "teacher" else "scratch"
            result = run_arm(arm_spec, ns, train_dir, val_dir)
            row = {"draw": i, "arm": arm, "knobs": k, **result}
            with open(log, "ab+") as f:
                if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                    f.write(b"\n")  # after a line cut short by a kill
                f.write((json.dumps(row) + "\n").encode())
            done[(i, arm)] = row
            print(f"draw {i} {arm} {k}: {row['val_psnr_y']}", flush=True)

    summary = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"{args.draws} draws; Spearman rho of validation k with the last ({args.steps} steps)")
    for arm in args.arms:
        curves = []
        for i in range(args.draws):
            psnr = done[(i, arm)]["val_psnr_y"]
            curves.append([psnr[s] for s in sorted(psnr, key=int) if int(s) > 0])  # not step 0
        rho = spearman_by_rung(curves)
        summary[arm] = {"rho_by_validation": rho, "curves": curves}
        print(f"{arm:8} " + "  ".join(f"k={j + 1}: {r:+.2f}" for j, r in enumerate(rho)))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
