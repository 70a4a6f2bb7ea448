"""On the GPU machine: `python -m benchmarks.gpu_check --out $OUT` (a few minutes on an H200).

One prepared check of the Triton selective scan (model/scan_triton.py) for a GPU session, in three
parts, each recorded in DIR/gpu_check.json even when another part fails:

1. correctness: the Triton scan against ``selective_scan_ref`` (float64, same device, same rounded
   inputs) on y, the final state and all six gradients, for the default launch plan, one segment
   per sequence, many segments, bfloat16 inputs and strong decay; plus whether two backward passes
   give bitwise-equal gradients. ``max_rel`` is max|error| / max(1, max|reference|).
2. timing: median ms of triton and chunked scans, forward (no grad) and forward+backward, float32
   and bfloat16 inputs (A and D stay float32, as under autocast), at B = 1 and 128, with
   chunked/triton ratios, peak memory and the launch plan triton chose.
3. training: one Adam step with an L1 loss on the student (batch 128, 64x64 LR patches, x4),
   scan="triton" then scan="chunked": ms per step, peak memory, and the scan form that ran.

    python -m benchmarks.gpu_check --out DIR [--device cuda|cpu]

``--device cpu`` runs the same script on the CPU at small sizes, under Triton's interpreter (it sets
TRITON_INTERPRET=1 before anything imports Triton): a check of the script itself, not of speed.
The sizes used are written to the JSON. Exit status: 0 when every part passed, 1 when the
correctness check failed (or did not run), 2 when only timing or training failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

SIZES = {
    "cuda": {
        "correctness": dict(batch=2, length=1000, inner=48, n_state=16),
        "timing": dict(batches=[1, 128], length=4096, inner=64, n_state=16, repeats=10, warmup=2),
        "training": dict(preset="student", batch=128, patch=64, repeats=5, warmup=2),
    },
    "cpu": {
        "correctness": dict(batch=1, length=40, inner=12, n_state=4),
        "timing": dict(batches=[1, 2], length=32, inner=16, n_state=4, repeats=1, warmup=0),
        "training": dict(preset="tiny", batch=2, patch=16, repeats=1, warmup=1),
    },
}
TOL = {"float32": 1e-4, "bfloat16": 3e-2}  # on max_rel
NAMES = ("u", "delta", "A", "B", "C", "D")
SCALE = 4  # the presets' upscaling factor: HR targets are 4x the LR patch


def _part(name: str, fn, report: dict) -> None:
    """Run one part; an exception is recorded with its traceback and the next part still runs."""
    start = time.perf_counter()
    try:
        result = fn()
        result.setdefault("ok", True)
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    result["wall_s"] = round(time.perf_counter() - start, 2)
    report[name] = result


def _random_inputs(torch, batch, length, inner, n_state, max_step_decay=2.0, seed=0):
    """float64 CPU inputs, |delta * A| per step below max_step_decay (as tests/test_scan_triton.py)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    u = torch.randn(batch, length, inner, **f64)
    delta = torch.rand(batch, length, inner, **f64) * 0.5 + 0.01
    A = -(torch.rand(inner, n_state, **f64) * (max_step_decay / 0.51 - 0.1) + 0.1)
    B = torch.randn(batch, length, n_state, **f64)
    C = torch.randn(batch, length, n_state, **f64)
    D = torch.randn(inner, **f64)
    return [u, delta, A, B, C, D]


def _grads(fn, inputs, dy, dh):
    """y, final state and the gradients of sum(y * dy) + sum(h * dh)."""
    import torch

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, h = fn(*leaves)
    loss = (y.double() * dy).sum() + (h.double() * dh).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [y.detach(), h.detach(), *grads]


def correctness(device: str, sizes: dict) -> dict:
    import torch

    import model.scan_triton as st
    from model.scan import selective_scan_ref

    batch, length, inner, n_state = (sizes[k] for k in ("batch", "length", "inner", "n_state"))
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [  # name, input dtypes (u, delta, A, B, C, D), launch-plan overrides, max_step_decay
        ("float32, default plan", [f32] * 6, {}, 2.0),
        ("float32, one segment", [f32] * 6, dict(chunks_per_segment=10**9), 2.0),
        ("float32, 1 chunk per segment, 8 channels", [f32] * 6, dict(chunks_per_segment=1, block_e=8), 2.0),
        ("bfloat16 u, delta, B, C", [bf16, bf16, f32, bf16, bf16, f32], {}, 2.0),
        ("float32, strong decay (delta * A to -400)", [f32] * 6, {}, 400.0),
    ]  # fmt: skip
    out = {"cases": [], "tolerance_max_rel": TOL}
    for i, (name, dtypes, plan, decay) in enumerate(cases):
        base = _random_inputs(torch, batch, length, inner, n_state, decay, seed=i)
        inputs = [t.to(device, dt) for t, dt in zip(base, dtypes)]
        g = torch.Generator().manual_seed(100 + i)
        dy = torch.randn(batch, length, inner, generator=g, dtype=torch.float64).to(device)
        dh = torch.randn(batch, inner, n_state, generator=g, dtype=torch.float64).to(device)
        got = _grads(lambda *a, plan=plan: st._scan(*a, **plan), inputs, dy, dh)
        ref = _grads(
            lambda *a: selective_scan_ref(*a, return_final_state=True), [t.double() for t in inputs], dy, dh
        )
        tol = TOL["bfloat16" if bf16 in dtypes else "float32"]
        errors = {}
        for key, a, b in zip(["y", "final_state"] + [f"grad_{n}" for n in NAMES], got, ref):
            err = (a.double() - b).abs().max().item()
            errors[key] = {
                "max_abs": err,
                "max_rel": err / max(1.0, b.abs().max().item()),
                "finite": bool(torch.isfinite(a).all()),
            }
        dtype_ok = got[0].dtype == inputs[0].dtype and all(
            g.dtype == t.dtype for g, t in zip(got[2:], inputs)
        )
        passed = dtype_ok and all(e["finite"] and e["max_rel"] <= tol for e in errors.values())
        plan_used = st._plan(inputs[0], n_state, **plan)
        out["cases"].append(
            {"name": name, "plan": dataclasses.asdict(plan_used), "tolerance": tol, "dtypes_ok": dtype_ok}
            | {"errors": errors, "passed": passed}
        )

    # Deterministic gradients: dB, dC (sums over channel blocks) and dA are added in a fixed order.
    base = [t.to(device, f32) for t in _random_inputs(torch, batch, length, inner, n_state, seed=99)]
    dy = torch.randn(batch, length, inner, dtype=torch.float64, device=device)
    dh = torch.randn(batch, inner, n_state, dtype=torch.float64, device=device)
    first = _grads(st._scan, base, dy, dh)
    second = _grads(st._scan, base, dy, dh)
    out["deterministic"] = all(torch.equal(a, b) for a, b in zip(first, second))
    out["passed"] = out["deterministic"] and all(c["passed"] for c in out["cases"])
    out["ok"] = out["passed"]
    return out


def timing(device: str, sizes: dict) -> dict:
    import torch

    import model.scan_triton as st
    from benchmarks.common import time_ms
    from model.scan import selective_scan_chunked

    cuda = device == "cuda"
    length, inner, n_state = sizes["length"], sizes["inner"], sizes["n_state"]
    reps = dict(repeats=sizes["repeats"], warmup=sizes["warmup"], cuda=cuda)
    forms = {
        "triton": lambda *a: st.selective_scan_triton(*a),
        "chunked": lambda *a: selective_scan_chunked(*a),
    }
    results, failures = [], 0
    for batch in sizes["batches"]:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            u = torch.randn(batch, length, inner, generator=g)
            delta = torch.nn.functional.softplus(torch.randn(batch, length, inner, generator=g) - 2)
            A = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(inner, 1)
            B, C = (torch.randn(batch, length, n_state, generator=g) for _ in range(2))
            D = torch.randn(inner, generator=g)
            inputs = [t.to(device) for t in (u, delta, A, B, C, D)]
            for i in (0, 1, 3, 4):  # u, delta, B, C in the input dtype; A, D float32 as under autocast
                inputs[i] = inputs[i].to(dtype)
            dy = torch.randn(batch, length, inner, generator=g).to(device, dtype)
            leaves = [t.clone().requires_grad_() for t in inputs]
            for impl, fn in forms.items():
                for mode in ("forward", "forward_backward"):
                    entry = {"impl": impl, "batch": batch, "dtype": str(dtype).split(".")[-1], "mode": mode}
                    if impl == "triton":
                        entry["plan"] = dataclasses.asdict(st._plan(inputs[0], n_state))

                    def run(fn=fn, mode=mode):
                        if mode == "forward":
                            with torch.no_grad():
                                return fn(*inputs)
                        return torch.autograd.grad(fn(*leaves), leaves, dy)

                    try:
                        entry["ms"] = time_ms(run, **reps)
                        if cuda:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            run()
                            torch.cuda.synchronize()
                            entry["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                    except Exception:
                        entry["error"] = traceback.format_exc()
                        failures += 1
                    results.append(entry)
                    if cuda:
                        torch.cuda.empty_cache()
    ratios = []
    for r in results:
        if r["impl"] == "triton" and "ms" in r:
            key = (r["batch"], r["dtype"], r["mode"])
            other = [
                c for c in results if c["impl"] == "chunked" and (c["batch"], c["dtype"], c["mode"]) == key
            ]
            if other and "ms" in other[0]:
                ratios.append(
                    dict(zip(("batch", "dtype", "mode"), key))
                    | {"chunked_over_triton": other[0]["ms"] / r["ms"]}
                )
    return {"ok": failures == 0, "results": results, "ratios": ratios}  # fmt: skip


def training(device: str, sizes: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks.common import time_ms
    from model import build_model
    from model.scan import SelectiveScan

    cuda = device == "cuda"
    batch, patch = sizes["batch"], sizes["patch"]
    results, failures = [], 0
    for scan in ("triton", "chunked"):
        entry = {"scan": scan, "preset": sizes["preset"], "batch": batch, "patch": patch}
        try:
            torch.manual_seed(0)
            net = build_model(sizes["preset"], scan=scan).to(device).train()
            ssm = next(m for m in net.modules() if isinstance(m, SelectiveScan))
            entry["resolved_scan"] = ssm.form(torch.device(device))  # "triton" falls back where it cannot run
            if cuda and entry["resolved_scan"] != scan:
                raise RuntimeError(f"scan={scan!r} ran as {entry['resolved_scan']!r} on CUDA")
            opt = torch.optim.Adam(net.parameters(), lr=2e-4)
            lr_img = torch.rand(batch, 3, patch, patch, device=device)
            hr_img = torch.rand(batch, 3, SCALE * patch, SCALE * patch, device=device)
            losses = []

            def step(net=net, opt=opt, lr_img=lr_img, hr_img=hr_img, losses=losses):
                opt.zero_grad(set_to_none=True)
                loss = F.l1_loss(net(lr_img), hr_img)
                loss.backward()
                opt.step()
                losses.append(loss.detach())

            if cuda:
                step()  # compile the kernels before the peak-memory window
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            entry["ms_per_step"] = time_ms(step, repeats=sizes["repeats"], warmup=sizes["warmup"], cuda=cuda)
            if cuda:
                entry["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            entry["last_loss"] = losses[-1].item()
            if not torch.isfinite(losses[-1]):
                raise FloatingPointError(f"the loss is {entry['last_loss']}")
            del net, opt, lr_img, hr_img, losses
        except Exception:
            entry["error"] = traceback.format_exc()
            failures += 1
        results.append(entry)
        if cuda:
            torch.cuda.empty_cache()
    return {"ok": failures == 0, "results": results}


def summary(report: dict) -> str:
    lines = [f"{report['machine']}", f"device {report['device']}, triton {report['versions']['triton']}"]
    c = report.get("correctness", {})
    if "cases" in c:
        for case in c["cases"]:
            worst = max(case["errors"].items(), key=lambda kv: kv[1]["max_rel"])
            flag = "ok  " if case["passed"] else "FAIL"
            lines.append(f"{flag} {case['name']}: worst {worst[0]} max_rel {worst[1]['max_rel']:.2e}")
        lines.append(f"deterministic gradients: {c['deterministic']}")
    for r in report.get("timing", {}).get("results", []):
        ms = f"{r['ms']:9.3f} ms" if "ms" in r else "   failed   "
        mem = f"   peak {r['peak_mem_mb']:8.0f} MiB" if "peak_mem_mb" in r else ""
        lines.append(f"{r['impl']:8s} B={r['batch']:<4d} {r['dtype']:9s} {r['mode']:17s} {ms}{mem}")
    for r in report.get("timing", {}).get("ratios", []):
        lines.append(
            f"chunked/triton B={r['batch']} {r['dtype']} {r['mode']}: {r['chunked_over_triton']:.1f}x"
        )
    for r in report.get("training", {}).get("results", []):
        ms = f"{r['ms_per_step']:.1f} ms/step" if "ms_per_step" in r else "failed"
        mem = f", peak {r['peak_mem_mb']:.0f} MiB" if "peak_mem_mb" in r else ""
        lines.append(f"train {r['scan']} (ran as {r.get('resolved_scan')}): {ms}{mem}")
    for name in report["failed_parts"]:
        lines.append(f"PART FAILED: {name}\n{report[name].get('error', '(see the JSON)')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    if args.device == "cpu":
        # Triton reads this when the kernels are decorated, i.e. when model.scan_triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    from benchmarks.common import machine

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    start = time.perf_counter()
    report = {
        "device": args.device,
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
        },
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "sizes": SIZES[args.device],
    }
    if args.device == "cuda" and not torch.cuda.is_available():
        report["correctness"] = {"ok": False, "error": "--device cuda but torch sees no CUDA device"}
    else:
        sizes = SIZES[args.device]
        _part("correctness", lambda: correctness(args.device, sizes["correctness"]), report)
        _part("timing", lambda: timing(args.device, sizes["timing"]), report)
        _part("training", lambda: training(args.device, sizes["training"]), report)
    report["failed_parts"] = [
        k for k in ("correctness", "timing", "training") if not report.get(k, {}).get("ok")
    ]
    report["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(summary(report))
    print(f"wrote {args.out / 'gpu_check.json'} in {report['wall_s']} s")
    if "correctness" in report["failed_parts"]:
        return 1
    return 2 if report["failed_parts"] else 0


if __name__ == "__main__":
    sys.exit(main())
