"""Agreement of our bicubic downscaler with the MATLAB-made LR files, and the bicubic baselines.

python -m benchmarks.bench_degrade [--data ../shared/data/sr-benchmarks]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from trainers.data import load_pairs
from trainers.degrade import imresize
from trainers.metrics import psnr, ssim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/sr-benchmarks")
    p.add_argument("--sets", nargs="+", default=["Set5", "Set14", "BSD100"])
    args = p.parse_args()
    total = exact = within_one = 0
    worst = 0
    head = f"{'set':8s} {'identical':>10s} {'within 1':>9s} {'max diff':>8s}"
    print(f"{head} {'bicubic PSNR-Y':>15s} {'SSIM-Y':>7s}")
    for name in args.sets:
        pairs = load_pairs(Path(args.data) / name, scale=4)
        n = e = w = m = 0
        for pair in pairs:
            d = np.abs(imresize(pair.hr, 0.25).astype(int) - pair.lr.astype(int))
            n, e, w, m = n + d.size, e + int((d == 0).sum()), w + int((d <= 1).sum()), max(m, int(d.max()))
        ps = np.mean([psnr(imresize(q.lr, 4), q.hr, 4) for q in pairs])
        ss = np.mean([ssim(imresize(q.lr, 4), q.hr, 4) for q in pairs])
        print(f"{name:8s} {100 * e / n:9.2f}% {100 * w / n:8.2f}% {m:8d} {ps:15.2f} {ss:7.4f}")
        total, exact, within_one, worst = total + n, exact + e, within_one + w, max(worst, m)
    print(f"{'all':8s} {100 * exact / total:9.2f}% {100 * within_one / total:8.2f}% {worst:8d}")


if __name__ == "__main__":
    main()
