"""Selective scan forms in one run: reference, chunked, fused (CPU) or triton (CUDA), and mamba-ssm.

    python -m benchmarks.bench_scan [--device cpu|cuda] [--batch 1 8] [--length 4096] [--inner 64]

Prints, per batch size, each form's forward (no grad) and forward+backward median times in ms and
its speed-up over the reference measured in the same run (the ratios are what to compare across
machines). float32, E=64, L=4096 (one 64x64 LR patch), N=16 by default.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import machine, time_ms
from model.scan import mamba_ssm_available, resolve_scan, selective_scan


def make(batch, length, inner, state, device, dtype):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, length, inner, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, inner, generator=g) - 2)
    A = -torch.arange(1, state + 1, dtype=torch.float32).repeat(inner, 1)
    B = torch.randn(batch, length, state, generator=g)
    C = torch.randn(batch, length, state, generator=g)
    D = torch.randn(inner, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (u, delta, A, B, C, D)]


def forms_for(device: str) -> list[str]:
    kernel = "triton" if device.startswith("cuda") else "fused"
    forms = ["reference", "chunked"]
    if resolve_scan(kernel, device) == kernel:
        forms.append(kernel)
    if device.startswith("cuda") and mamba_ssm_available():
        forms.append("mamba_ssm")
    return forms


def bench(batch: int, args, forms: list[str]) -> dict:
    cuda = args.device.startswith("cuda")
    inputs = make(batch, args.length, args.inner, args.state, args.device, torch.float32)
    out = {}
    for impl in forms:
        repeats = max(1, args.repeats // 3) if impl == "reference" else args.repeats
        with torch.no_grad():
            fwd = time_ms(lambda impl=impl: selective_scan(*inputs, impl=impl), repeats, cuda=cuda)
        leaves = [t.clone().requires_grad_() for t in inputs]

        def step(impl=impl):
            for t in leaves:
                t.grad = None
            selective_scan(*leaves, impl=impl).sum().backward()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fwd_bwd = time_ms(step, repeats, cuda=cuda)
        mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        out[impl] = {"forward_ms": fwd, "forward_backward_ms": fwd_bwd, "peak_mem_mib": mem}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--inner", type=int, default=64)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="write results here")
    args = p.parse_args()
    forms = forms_for(args.device)
    results = {"machine": machine(), "shape": vars(args), "batches": {}}
    print(results["machine"])
    for batch in args.batch:
        r = results["batches"][str(batch)] = bench(batch, args, forms)
        print(f"B={batch} E={args.inner} L={args.length} N={args.state} float32 on {args.device}")
        ref = r["reference"]
        for impl in forms:
            x = r[impl]
            line = f"  {impl:10s} forward {x['forward_ms']:9.2f} ms   "
            line += f"forward+backward {x['forward_backward_ms']:9.2f} ms"
            if impl != "reference":
                line += (
                    f"   vs reference {ref['forward_ms'] / x['forward_ms']:6.1f}x / "
                    f"{ref['forward_backward_ms'] / x['forward_backward_ms']:6.1f}x"
                )
            if x["peak_mem_mib"] is not None:
                line += f"   peak {x['peak_mem_mib']:.0f} MiB"
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
