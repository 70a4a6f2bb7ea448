"""Students that start from their teacher against students from scratch: validation PSNR-Y against
training steps, with the same seed, data and recipe.

    python -m benchmarks.inherit_curve --out runs/inherit --teacher dvmsr:PATH/team07_DVMSR.pth \
        --train-data PHOTOS/SunHays80 --embed-dim 32 --rank 2 --steps 200 --val-every 100 \
        --arms scratch teacher:weights teacher:activations --topology paper \
        --test-data BENCH/Set5

Choices (the channel criterion, the topology) are made on a validation split of the training
photos: the last ``--val-images`` of ``--train-data`` by file name are held out, and every curve is
measured on them. The test sets (``--test-data``) are evaluated once, at the end, for the record.
``--curve-data FOLDER`` measures the curve on FOLDER instead (e.g. Set5, for a record of PSNR
against steps on a test set): such a run chooses nothing.

An arm is ``scratch`` or ``teacher:CRITERION``. ``--topology paper`` is the seed paper's network
(the presets); ``teacher`` is DVMSR's (a LayerNorm after the first conv, no per-block residual);
``default`` is what training does: a student that inherits takes its teacher's topology, one from
scratch keeps the preset's.
The recipe is the CPU budget run's (benchmarks/quality_cpu.sh): Adam at ``--lr``, batch 16 of 32x32
LR patches, alpha 0.5, the learning rate halved at 50/80/90/95% of the run. Writes ``OUT/curves.json``
and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from edge_agent import argtypes

TOPOLOGIES = {"paper": {}, "teacher": {"embed_norm": True, "block_residual": False}, "default": {}}


class Curve:
    """A tracker that keeps each validation's PSNR-Y by step."""

    def __init__(self):
        self.psnr: dict[int, float] = {}

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        if "val_psnr_y" in metrics:
            self.psnr[step] = metrics["val_psnr_y"]

    def log_artifact(self, path, artifact_path=None):
        pass

    def close(self, status="FINISHED"):
        pass


def split(photos: Path, val_images: int, root: Path) -> tuple[Path, Path]:
    """``root/train`` and ``root/val``: links to the photos, the last ``val_images`` by name held out."""
    from trainers.data import IMAGE_SUFFIXES

    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) <= val_images:
        raise SystemExit(f"error: {photos} has {len(files)} images; need more than --val-images {val_images}")
    parts = {"train": files[:-val_images], "val": files[-val_images:]}
    for name, chosen in parts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in chosen:
            link = folder / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return root / "train", root / "val"


def run_arm(arm: str, args, train_dir: Path, val_dir: Path) -> dict:
    """One arm's curve: step 0 (the starting weights) and every validation of its training."""
    from model.inherit import in_teacher_topology
    from model.mambalitesr import load_model, preset
    from trainers.data import PatchSampler, load_sets
    from trainers.evaluate import evaluate_set, super_resolve
    from trainers.train import TrainConfig, load_teacher, starting_network, train, validate

    init, _, criterion = arm.partition(":")
    model = preset(args.preset, embed_dim=args.embed_dim, rank=args.rank, **TOPOLOGIES[args.topology])
    cfg = TrainConfig(
        role="student",
        model=model,
        teacher=args.teacher,
        alpha=args.alpha,
        init=init,
        init_criterion=criterion or "weights",
        init_topology="own",  # the topology is this benchmark's --topology
        lr=args.lr,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        iterations=args.steps,
        val_every=args.val_every,
        log_every=max(1, args.steps // 10),
        seed=args.seed,
        train_data=(str(train_dir),),
        val_data=(str(val_dir),),
        out_dir=str(Path(args.out) / arm.replace(":", "-")),
        device="cpu",
    )
    device = torch.device("cpu")
    val_pairs = load_sets([str(val_dir)], "val", model.scale)  # what the curve is measured on
    # step 0: the weights training starts from, built as train() builds them
    sampler = PatchSampler(
        load_sets([str(train_dir)], "train", model.scale), cfg.patch_size, model.scale, seed=cfg.seed
    )
    teacher = load_teacher(cfg, device)
    if init == "teacher" and args.topology == "default":
        cfg = dataclasses.replace(cfg, model=in_teacher_topology(cfg.model, teacher.cfg))
    start = starting_network(cfg, teacher, sampler)
    curve = Curve()
    curve.psnr[0] = validate(start, val_pairs, device)["val_psnr_y"]
    t0 = time.monotonic()
    result = train(cfg, curve)
    wall = time.monotonic() - t0
    test = {}
    if args.test_data:
        net = load_model(result.checkpoint).eval()
        for folder in args.test_data:
            pairs, name = load_sets([folder], "test", model.scale), Path(folder).name
            test[name] = evaluate_set(
                lambda lr: super_resolve(net, lr, device), pairs, model.scale, name
            ).psnr_y
    return {
        "val_psnr_y": {str(k): v for k, v in sorted(curve.psnr.items())},
        "train_s": wall,
        "test_psnr_y": test,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.inherit_curve", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", required=True, help="teacher checkpoint, or dvmsr / dvmsr:PATH")
    p.add_argument("--train-data", required=True, type=Path, help="a folder of HR photos")
    p.add_argument("--val-images", type=argtypes.positive_int, default=10)
    p.add_argument(
        "--preset", default="student", help="the student's other dimensions (groups, blocks, d_state)"
    )
    p.add_argument("--embed-dim", type=argtypes.positive_int, default=32)
    p.add_argument("--rank", type=argtypes.positive_int, default=2)
    p.add_argument("--topology", choices=sorted(TOPOLOGIES), default="default")
    p.add_argument("--arms", nargs="+", default=["scratch", "teacher:weights", "teacher:activations"])
    p.add_argument("--steps", type=argtypes.positive_int, default=200)
    p.add_argument("--val-every", type=argtypes.positive_int, default=100)
    p.add_argument("--alpha", type=argtypes.fraction, default=0.5)
    p.add_argument("--lr", type=argtypes.positive_float, default=2e-3)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=16)
    p.add_argument("--patch-size", type=argtypes.positive_int, default=32)
    p.add_argument("--seed", type=argtypes.nonnegative_int, default=0)
    p.add_argument("--test-data", nargs="*", default=[], help="test set folders, evaluated once at the end")
    p.add_argument(
        "--curve-data", type=Path, help="measure the curve on this folder, not on the held-out split"
    )
    args = p.parse_args(argv)
    for arm in args.arms:
        init, _, criterion = arm.partition(":")
        if arm != "scratch" and not (init == "teacher" and criterion in ("weights", "activations")):
            p.error(f"--arms: {arm!r} is not scratch, teacher:weights or teacher:activations")
    out = Path(args.out)
    train_dir, val_dir = split(args.train_data, args.val_images, out / "data")
    if args.curve_data is not None:
        val_dir = args.curve_data
    results = {}
    for arm in args.arms:
        results[arm] = run_arm(arm, args, train_dir, val_dir)
        print(f"{arm}: {json.dumps(results[arm])}", flush=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (out / "curves.json").write_text(json.dumps({"settings": settings, "arms": results}, indent=1))
    steps = sorted({int(s) for r in results.values() for s in r["val_psnr_y"]})
    print("arm".ljust(22) + "".join(f"{s:>9}" for s in steps) + "   (validation PSNR-Y, dB, by step)")
    for arm, r in results.items():
        print(arm.ljust(22) + "".join(f"{r['val_psnr_y'].get(str(s), float('nan')):9.2f}" for s in steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
