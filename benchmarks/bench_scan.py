"""Selective scan: sequential reference vs chunked form (and mamba-ssm on CUDA when installed).

    python benchmarks/bench_scan.py [--device cpu|cuda] [--length 4096] [--inner 64] [--state 16]

Prints one line per form: forward and forward+backward median times in ms, and the speed-up of the
chunked form over the reference.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import machine, time_ms
from model.scan import mamba_ssm_available, selective_scan


def make(batch, length, inner, state, device, dtype):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, length, inner, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, inner, generator=g) - 2)
    A = -torch.arange(1, state + 1, dtype=torch.float32).repeat(inner, 1)
    B = torch.randn(batch, length, state, generator=g)
    C = torch.randn(batch, length, state, generator=g)
    D = torch.randn(inner, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (u, delta, A, B, C, D)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--inner", type=int, default=64)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write results here")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    inputs = make(args.batch, args.length, args.inner, args.state, args.device, torch.float32)
    forms = ["reference", "chunked"] + (["mamba_ssm"] if cuda and mamba_ssm_available() else [])

    results = {"machine": machine(), "shape": vars(args)}
    for impl in forms:
        with torch.no_grad():
            fwd = time_ms(lambda impl=impl: selective_scan(*inputs, impl=impl), args.repeats, cuda=cuda)
        leaves = [t.clone().requires_grad_() for t in inputs]

        def step(impl=impl):
            selective_scan(*leaves, impl=impl).sum().backward()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fwd_bwd = time_ms(step, max(1, args.repeats // 2) if impl == "reference" else args.repeats, cuda=cuda)
        mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        results[impl] = {"forward_ms": fwd, "forward_backward_ms": fwd_bwd, "peak_mem_mib": mem}

    print(results["machine"])
    print(f"B={args.batch} E={args.inner} L={args.length} N={args.state} float32 on {args.device}")
    ref = results["reference"]
    for impl in forms:
        r = results[impl]
        line = f"{impl:10s} forward {r['forward_ms']:9.2f} ms   "
        line += f"forward+backward {r['forward_backward_ms']:9.2f} ms"
        if impl != "reference":
            line += (
                f"   speed-up {ref['forward_ms'] / r['forward_ms']:.1f}x / "
                f"{ref['forward_backward_ms'] / r['forward_backward_ms']:.1f}x"
            )
        if r["peak_mem_mib"] is not None:
            line += f"   peak {r['peak_mem_mib']:.0f} MiB"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
