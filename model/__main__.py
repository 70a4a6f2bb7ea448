"""Print parameter and FLOP counts of the presets: ``python -m model [--height 64 --width 64]``."""

import argparse

from edge_agent.argtypes import positive_int
from model import PRESETS, build_model, count_flops, count_params

p = argparse.ArgumentParser(prog="python -m model", description=__doc__)
p.add_argument("--height", type=positive_int, default=64, help="LR input height for FLOPs (default 64)")
p.add_argument("--width", type=positive_int, default=64, help="LR input width for FLOPs (default 64)")
args = p.parse_args()
header = f"{'preset':8s} {'C':>3s} {'GxK':>5s} {'rank':>4s} {'params':>9s} {'GFLOPs':>8s}"
print(f"{header}  (at {args.height}x{args.width})")
for name, cfg in PRESETS.items():
    flops = count_flops(cfg, args.height, args.width)
    print(
        f"{name:8s} {cfg.embed_dim:3d} {cfg.n_groups:2d}x{cfg.blocks_per_group:<2d} {cfg.rank:4d} "
        f"{count_params(build_model(cfg)):9,d} {flops.gflops:8.3f}"
    )
