"""Peak resident memory and time of one training step of a preset, by scan form; for the chunked
form, with and without recomputing the scan in the backward pass.

    python -m benchmarks.bench_memory --preset student --batch 8 [--scan auto] [--no-checkpoint]

Run each variant in its own process: peak RSS only grows.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from benchmarks.common import machine
from model import build_model
from model.scan import SCAN_FORMS, SelectiveScan, resolve_scan


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="student")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--scan", default="auto", choices=SCAN_FORMS)
    p.add_argument(
        "--no-checkpoint", action="store_true", help="chunked: keep the scan's intermediates instead"
    )
    args = p.parse_args()
    torch.manual_seed(0)
    net = build_model(args.preset, scan=args.scan).train()
    if args.no_checkpoint:
        for m in net.modules():
            if isinstance(m, SelectiveScan):
                m.train(False)  # the scan checkpoints only in training mode
    x = torch.rand(args.batch, 3, args.patch, args.patch)
    t0 = time.perf_counter()
    y = net(x)
    fwd_s, fwd_gb = time.perf_counter() - t0, peak_gb()
    y.square().mean().backward()
    step_s = time.perf_counter() - t0
    form = resolve_scan(args.scan, "cpu")
    mode = "kernel" if form == "fused" else ("kept" if args.no_checkpoint else "recomputed")
    print(machine())
    print(
        f"{args.preset} batch {args.batch} x {args.patch}x{args.patch}, {form} scan ({mode}): "
        f"forward {fwd_s:.2f} s, peak {fwd_gb:.2f} GB; "
        f"forward+backward {step_s:.2f} s, peak {peak_gb():.2f} GB"
    )


if __name__ == "__main__":
    main()
