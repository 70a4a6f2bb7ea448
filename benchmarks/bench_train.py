"""Training throughput on this machine: LR patches per second for teacher and student steps.

    python -m benchmarks.bench_train [--batch-size 8] [--patch-size 64] [--steps 6] [--scan auto]

The student is timed with distillation (the teacher's forward pass included) and without. --scan
sets the scan form of both networks ("chunked" gives the figures from before the fused kernel).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine
from model import preset
from model.scan import SCAN_FORMS, resolve_scan
from trainers.train import TrainConfig, train


class Quiet:
    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def close(self, status="FINISHED"):
        pass


def run(cfg: TrainConfig) -> dict:
    r = train(cfg, Quiet())
    return {"patches_per_s": r.patches_per_s, "teacher_share": r.teacher_share}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--scan", default="auto", choices=SCAN_FORMS)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            batch_size=args.batch_size,
            patch_size=args.patch_size,
            iterations=args.steps,
            val_every=args.steps,
            val_max_images=1,
            device=args.device,
        )
        teacher, student = preset("teacher", scan=args.scan), preset("student", scan=args.scan)
        rows["teacher"] = run(TrainConfig(role="teacher", model=teacher, out_dir=f"{tmp}/t", **common))
        rows["student (alpha=0)"] = run(
            TrainConfig(role="student", model=student, alpha=0.0, out_dir=f"{tmp}/s0", **common)
        )
        rows["student (distilled)"] = run(
            TrainConfig(
                role="student",
                model=student,
                alpha=0.5,
                teacher=f"{tmp}/t/last.pt",
                out_dir=f"{tmp}/s1",
                **common,
            )
        )
    print(machine())
    device = (
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    form = resolve_scan(args.scan, device)
    print(
        f"batch {args.batch_size} x {args.patch_size}x{args.patch_size} LR patches, "
        f"{args.steps} steps, scan {form}"
    )
    for name, r in rows.items():
        share = f", teacher {100 * r['teacher_share']:.0f}% of a step" if r["teacher_share"] else ""
        print(f"{name:20s} {r['patches_per_s']:8.2f} patches/s{share}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "args": vars(args), "scan_form": form, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
