"""The chunked and fused scans (and, on CUDA, mamba-ssm) against the sequential reference.

The Triton kernel has its own module, tests/test_scan_triton.py.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.scan as scan_mod
from model import cpu_kernel
from model.scan import (
    MAX_CHUNK,
    fused_available,
    log_decay_floor,
    mamba_ssm_available,
    resolve_scan,
    selective_scan,
    selective_scan_chunked,
    selective_scan_fused,
    selective_scan_ref,
)

ROOT = Path(__file__).resolve().parents[1]

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def make_inputs(
    batch=2, length=37, inner=6, n_state=4, dtype=torch.float64, device="cpu", max_step_decay=2.0, seed=0
):
    """Random scan inputs; |delta * A| per step stays below max_step_decay."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, inner, generator=g, dtype=torch.float64)
    delta = torch.rand(batch, length, inner, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A = -(torch.rand(inner, n_state, generator=g, dtype=torch.float64) * (max_step_decay / 0.51 - 0.1) + 0.1)
    B = torch.randn(batch, length, n_state, generator=g, dtype=torch.float64)
    C = torch.randn(batch, length, n_state, generator=g, dtype=torch.float64)
    D = torch.randn(inner, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (u, delta, A, B, C, D)]


def grads(fn, inputs, weight):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, h = fn(*leaves, return_final_state=True)
    ((y * weight).sum() + h.sum()).backward()
    return y.detach(), h.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 5, 8, 37, 64, 200])
@pytest.mark.parametrize("chunk", [2, 4, 8])
def test_chunked_matches_reference(dtype, length, chunk):
    inputs = make_inputs(length=length, dtype=dtype, seed=length)
    weight = torch.randn(2, length, 6, dtype=dtype)
    y_ref, h_ref, g_ref = grads(selective_scan_ref, inputs, weight)
    y, h, g = grads(lambda *a, **k: selective_scan_chunked(*a, **k, chunk_size=chunk), inputs, weight)
    assert y.dtype == dtype and h.shape == (2, 6, 4)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref, **TOL[dtype])
    for name, a, b in zip("u delta A B C D".split(), g, g_ref):
        scale = b.abs().max().clamp(min=1)  # gradients sum over the sequence: compare relative to their size
        torch.testing.assert_close(a / scale, b / scale, **TOL[dtype], msg=f"grad of {name}")


def test_reference_follows_the_equations_by_hand():
    # One channel, one state, three steps, computed by hand.
    u = torch.tensor([[[1.0], [2.0], [-1.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5], [1.0], [0.25]]], dtype=torch.float64)
    A = torch.tensor([[-2.0]], dtype=torch.float64)
    B = torch.tensor([[[1.0], [0.5], [2.0]]], dtype=torch.float64)
    C = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=torch.float64)
    D = torch.tensor([0.1], dtype=torch.float64)
    e = torch.exp
    h1 = 0.5 * 1.0 * 1.0
    h2 = e(torch.tensor(-2.0)) * h1 + 1.0 * 2.0 * 0.5
    h3 = e(torch.tensor(-0.5)) * h2 + 0.25 * -1.0 * 2.0
    expected = torch.tensor([1 * h1 + 0.1, 2 * h2 + 0.2, 3 * h3 - 0.1], dtype=torch.float64)
    for fn in (selective_scan_ref, selective_scan_chunked):
        y, h = fn(u, delta, A, B, C, D, return_final_state=True)
        torch.testing.assert_close(y.flatten(), expected)
        torch.testing.assert_close(h.flatten(), h3.reshape(1).double())


def test_half_precision_inputs_stay_close():
    inputs = make_inputs(length=300, dtype=torch.float64, seed=3)
    y_ref = selective_scan_ref(*inputs)
    y16 = selective_scan_chunked(*[t.half() for t in inputs])
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    rel = (y16.double() - y_ref).abs().max() / y_ref.abs().max()
    assert rel < 5e-3, f"float16 relative error {rel:.2e}"


def test_strong_decay_stays_finite_and_bounded():
    # delta * A down to about -200 per step: far past the float32 floor (-16 at T = 8).
    u, delta, A, B, C, D = make_inputs(length=150, dtype=torch.float32, max_step_decay=200.0, seed=4)
    delta = delta * 2
    assert (delta[..., None] * A).min() < -3 * log_decay_floor(torch.float32, MAX_CHUNK)
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D)]
    y = selective_scan_chunked(*leaves)
    y.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves), "non-finite gradient"
    y = y.detach()
    y_ref = selective_scan_ref(*(t.double() for t in (u, delta, A, B, C, D)))
    assert torch.isfinite(y).all()
    # The floor lets exp(-16) = 1.1e-7 of a state through per step: float32-level differences.
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < 1e-5


def test_chunk_size_is_bounded():
    inputs = make_inputs(length=10)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(*inputs, chunk_size=MAX_CHUNK + 1)
    with pytest.raises(ValueError, match="unknown scan"):
        selective_scan(*inputs, impl="parallel")


def test_mamba_ssm_request_falls_back_off_cuda():
    inputs = make_inputs(length=20)
    torch.testing.assert_close(selective_scan(*inputs, impl="mamba_ssm"), selective_scan_chunked(*inputs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["chunked", "mamba_ssm"])
def test_cuda_scan_matches_reference(impl):
    if impl == "mamba_ssm" and not mamba_ssm_available():
        pytest.skip("mamba-ssm is not installed")
    inputs = make_inputs(length=333, inner=16, n_state=16, dtype=torch.float32, device="cuda")
    y_ref, h_ref = selective_scan_ref(*inputs, return_final_state=True)
    y, h = selective_scan(*inputs, return_final_state=True, impl=impl)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


# --- the fused CPU kernel -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused():
    # CI and developer machines have a C++ compiler: a kernel that does not build is a failure here
    # (the fallback has its own test below).
    assert fused_available(), "the fused CPU kernel did not build; see the warning above"
    return selective_scan_fused


def check_against_reference(fn, inputs, dtype, weight=None):
    batch, length, inner = inputs[0].shape
    weight = torch.randn(batch, length, inner, dtype=dtype) if weight is None else weight
    y_ref, h_ref, g_ref = grads(selective_scan_ref, inputs, weight)
    y, h, g = grads(fn, inputs, weight)
    assert y.dtype == dtype and h.shape == h_ref.shape
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref, **TOL[dtype])
    assert len(g) == len(g_ref)
    for name, a, b in zip("u delta A B C D".split(), g, g_ref):
        scale = b.abs().max().clamp(min=1)
        torch.testing.assert_close(a / scale, b / scale, **TOL[dtype], msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 5, 31, 32, 33, 100])
@pytest.mark.parametrize("inner", [6, 16, 40])  # one partial block, one full, two full and a partial
def test_fused_matches_reference(fused, dtype, length, inner):
    # FUSED_SEGMENT = 32: lengths below, at and above one segment, and several segments
    inputs = make_inputs(length=length, inner=inner, dtype=dtype, seed=length + inner)
    check_against_reference(fused, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_without_D_and_with_non_contiguous_inputs(fused, dtype):
    u, delta, A, B, C, _ = make_inputs(batch=3, length=70, inner=20, dtype=dtype, seed=7)
    # views with other strides: the kernel must see them as the same values
    u_t = u.transpose(1, 2).contiguous().transpose(1, 2)
    B_wide = torch.cat([B, torch.randn_like(B)], dim=-1)[..., : B.shape[-1]]
    A_t = A.t().contiguous().t()
    assert not (u_t.is_contiguous() or B_wide.is_contiguous() or A_t.is_contiguous())
    check_against_reference(fused, [u_t, delta, A_t, B_wide, C], dtype)
    check_against_reference(fused, [u_t, delta, A_t, B_wide, C, None][:5], dtype)


def test_fused_gradcheck_float64(fused, monkeypatch):
    # segments of 3 tokens: the backward pass crosses several checkpoints on a tiny problem
    monkeypatch.setattr(scan_mod, "FUSED_SEGMENT", 3)
    inputs = [t.requires_grad_() for t in make_inputs(batch=2, length=8, inner=18, n_state=3, seed=11)]

    def fn(u, delta, A, B, C, D):
        y, h = selective_scan_fused(u, delta, A, B, C, D, return_final_state=True)
        return y, h

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_fused_strong_decay_matches_reference(fused):
    # delta * A down to about -400 per step: exp underflows; the kernel saturates at exp(-87.3)
    u, delta, A, B, C, D = make_inputs(
        length=150, inner=20, dtype=torch.float32, max_step_decay=200.0, seed=4
    )
    delta = delta * 2
    assert (delta[..., None] * A).min() < -350
    inputs = [u, delta, A, B, C, D]
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = selective_scan_fused(*leaves)
    y.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves), "non-finite gradient"
    check_against_reference(selective_scan_fused, inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_precision_inputs(fused, dtype):
    inputs = make_inputs(length=120, inner=20, dtype=torch.float64, seed=3)
    y_ref = selective_scan_ref(*inputs)
    leaves = [t.to(dtype).requires_grad_() for t in inputs]
    y = selective_scan_fused(*leaves)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in leaves)
    # computed in float32 from inputs rounded to dtype: the error is the inputs' rounding
    y_32 = selective_scan_ref(*[t.detach().float() for t in leaves])
    torch.testing.assert_close(
        y.float(), y_32.to(dtype).float(), rtol=0, atol=2 * y_32.abs().max().item() * 2**-8
    )
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item() < 0.02


def test_fused_gives_the_same_bits_on_one_and_two_threads(fused):
    inputs = make_inputs(batch=3, length=90, inner=40, dtype=torch.float32, seed=5)
    weight = torch.randn(3, 90, 40)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads(selective_scan_fused, inputs, weight)
        torch.set_num_threads(2)
        two = grads(selective_scan_fused, inputs, weight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    for a, b in zip(one[2], two[2]):
        assert torch.equal(a, b)


def test_fused_without_gradients_saves_nothing_and_agrees(fused):
    inputs = make_inputs(length=64, inner=16, dtype=torch.float32, seed=9)
    with torch.no_grad():
        y, h = selective_scan_fused(*inputs, return_final_state=True)
    y_ref, h_ref = selective_scan_ref(*inputs, return_final_state=True)
    assert y.grad_fn is None
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(h, h_ref, **TOL[torch.float32])


def test_loading_the_kernel_leaves_denormals_alone(fused):
    # a build with -ffast-math would link code that sets flush-to-zero for the whole process
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 0.5).item() != 0.0


def test_auto_resolves_to_fused_on_the_cpu(fused):
    assert resolve_scan("auto", "cpu") == "fused"
    assert resolve_scan("fused", "cpu") == "fused"
    assert resolve_scan("triton", "cpu") == "chunked"  # Triton runs on CUDA only (tests use its interpreter)
    assert resolve_scan("mamba_ssm", "cpu") == "chunked"
    inputs = make_inputs(length=20)
    torch.testing.assert_close(selective_scan(*inputs), selective_scan_fused(*inputs))


def test_build_is_cached_per_cpu_feature_set(tmp_path, monkeypatch):
    first = cpu_kernel.build(directory=tmp_path)
    assert not first.cached and first.path.exists() and first.seconds > 0
    again = cpu_kernel.build(directory=tmp_path)
    assert again.cached and again.path == first.path
    assert cpu_kernel.load(again.path).ss_abi_version() == cpu_kernel.ABI_VERSION
    # another machine (say AVX2 only) sharing this cache directory must get its own build
    real = cpu_kernel.cpu_features()
    monkeypatch.setattr(cpu_kernel, "cpu_features", lambda: real.replace("avx512f", "") + " fake-avx2-only")
    monkeypatch.setattr(cpu_kernel, "_compile", lambda cxx, flags, out: out.write_bytes(b"other build"))
    other = cpu_kernel.build(directory=tmp_path)
    assert other.path != first.path and not other.cached
    assert not list(tmp_path.glob(".*.partial")), "a temporary build folder was left behind"


def test_a_cached_fallback_build_is_used_without_compiling_again(tmp_path, monkeypatch):
    # where the tuned flags fail, each new process must not retry (4-5 s) before the fallback it built
    cxx = cpu_kernel.find_compiler()
    fallback = tmp_path / f"selective_scan_cpu-{cpu_kernel.build_key(cxx, cpu_kernel.FLAGS)}.so"
    fallback.write_bytes(b"a plain build")

    def must_not_compile(*args):
        raise AssertionError("compiled although a usable build was cached")

    monkeypatch.setattr(cpu_kernel, "_compile", must_not_compile)
    found = cpu_kernel.build(directory=tmp_path)
    assert found.cached and found.path == fallback


def test_failed_build_leaves_no_file_and_says_why(tmp_path):
    fake = tmp_path / "fake-c++"
    fake.write_text(
        "#!/bin/sh\necho 'fake-c++ 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'error: no' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    with pytest.raises(cpu_kernel.KernelBuildError, match="failed to build"):
        cpu_kernel.build(cxx=str(fake), directory=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.so")) and not list((tmp_path / "cache").glob(".*.partial"))


# vector units without AVX-512's mask registers, where a branch in a lane loop keeps it scalar
NO_MASK_TARGET = {"x86_64": "-march=x86-64-v3", "aarch64": "-march=armv8-a"}


def test_every_lane_loop_that_calls_fast_exp_vectorizes_without_mask_registers(tmp_path):
    """The kernels' speed rests on their lane loops vectorizing, exp included. On AVX2 (no AVX-512
    masks) gcc kept fast_exp's clamp as a branch without -fno-trapping-math, and those loops ran
    scalar: 2-6x slower scans on such CPUs. Compiled here for AVX2 (NEON on ARM) whatever this CPU
    is; elsewhere for this CPU."""
    import shutil

    gcc = shutil.which("g++")
    assert gcc, "g++ is needed to build the kernels (scripts/setup.sh installs the build tools)"
    lines = cpu_kernel.SOURCE.read_text().splitlines()
    loops = set()  # line numbers of the lane loops whose bodies call exp
    for i, text in enumerate(lines):
        if "for (int w = 0; w < W; ++w)" not in text:
            continue
        body, depth, j = [text], text.count("{") - text.count("}"), i
        while depth > 0:
            j += 1
            body.append(lines[j])
            depth += lines[j].count("{") - lines[j].count("}")
        if any("fast_exp(" in b or "sigmoid(" in b for b in body):
            loops.add(i + 1)
    assert len(loops) >= 4, loops  # the scan's forward and backward, SiLU and its gradient
    flags = [*cpu_kernel.FLAGS, *cpu_kernel.OPENMP_FLAGS, "-fopt-info-vec-optimized"]
    flags.append(NO_MASK_TARGET.get(platform.machine(), "-march=native"))
    flags = [f for f in flags if f != "-shared"]
    res = subprocess.run(
        [gcc, *flags, "-c", str(cpu_kernel.SOURCE), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    vectorized = {
        int(line.split(":")[1])
        for line in res.stderr.splitlines()
        if line.startswith(str(cpu_kernel.SOURCE)) and "loop vectorized" in line
    }
    assert loops <= vectorized, f"lane loops left scalar at lines {sorted(loops - vectorized)}"


FALLBACK_SCRIPT = """
import torch
from model.scan import resolve_scan, selective_scan, selective_scan_chunked
from tests.test_scan import make_inputs
inputs = make_inputs(length=40)
for _ in range(3):
    y = selective_scan(*inputs, impl="fused")
torch.testing.assert_close(y, selective_scan_chunked(*inputs))
print("resolved:", resolve_scan("auto", "cpu"))
"""


def test_without_a_compiler_one_warning_and_the_chunked_form(tmp_path):
    env = {
        **os.environ,
        "MAMBALITESR_CXX": str(tmp_path / "no-such-compiler"),
        "MAMBALITESR_CACHE_DIR": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "resolved: chunked" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "fused CPU scan unavailable" in line]
    assert len(warnings) == 1, out.stderr
    assert "no-such-compiler" in warnings[0] and "apt-get install g++" in warnings[0]
