"""Student and teacher inference: PyTorch eager vs ONNX Runtime on the CPU, export node counts, and
the difference between tiled and whole-image inference.

    python benchmarks/bench_model.py [--presets student teacher] [--sizes 64 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, time_ms
from model import build_model, count_flops, upscale_tiled
from model.export import _session, export_onnx


def tiling_difference(net, size: int = 192) -> dict:
    """Tiled (64x64, overlap 16) vs whole-image output on a natural photo, values in [0, 1]."""
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    img = torch.nn.functional.interpolate(img[None], size=(size, size), mode="area")[0]
    with torch.no_grad():
        whole = net(img[None])[0]
    tiled = upscale_tiled(net, img, net.cfg.scale, tile=64, overlap=16)
    d = (tiled - whole).abs()
    return {
        "image": f"astronaut {size}x{size}",
        "mean_abs": d.mean().item(),
        "max_abs": d.max().item(),
        "p99_abs": torch.quantile(d.flatten()[:: max(1, d.numel() // 1_000_000)], 0.99).item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["student", "teacher"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write results here")
    args = p.parse_args()
    torch.manual_seed(0)
    results = {"machine": machine(), "rows": []}
    print(results["machine"])
    print("preset   input     GFLOPs  torch ms    ORT ms  nodes  fp32 err  fp16 err")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            net = build_model(name).eval()
            for side in args.sizes:
                x = torch.rand(1, 3, side, side)
                with torch.no_grad():
                    t_torch = time_ms(lambda: net(x), args.repeats)
                report = export_onnx(
                    net, Path(tmp) / f"{name}{side}.onnx", (1, 3, side, side), n_checks=1, seed=0
                )
                sess = _session(Path(report.path).read_bytes())
                feed = {sess.get_inputs()[0].name: x.numpy().astype(np.float32)}
                t_ort = time_ms(lambda: sess.run(None, feed), args.repeats)
                row = {
                    "preset": name,
                    "input": f"{side}x{side}",
                    "gflops": count_flops(net.cfg, side, side).gflops,
                    "torch_ms": t_torch,
                    "ort_ms": t_ort,
                    "nodes": report.node_count,
                    "fp32_err": report.fp32_max_abs_err,
                    "fp16_err": report.fp16_max_abs_err,
                }
                results["rows"].append(row)
                print(
                    f"{name:8s} {row['input']:8s} {row['gflops']:7.2f} {t_torch:9.1f} {t_ort:9.1f} "
                    f"{row['nodes']:6d}  {row['fp32_err']:.1e}   {row['fp16_err']:.1e}"
                )
            tiling = tiling_difference(net)
            results[f"tiling_{name}"] = tiling
            print(
                f"{name}: tiled vs whole on {tiling['image']}: mean {tiling['mean_abs']:.2e}, "
                f"p99 {tiling['p99_abs']:.2e}, max {tiling['max_abs']:.2e} (untrained weights)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
