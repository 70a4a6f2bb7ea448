"""The Triton scan against the sequential reference: outputs, final state and all six gradients.

Runs on a CUDA device when there is one, otherwise under Triton's CPU interpreter, which must be
switched on before model.scan_triton is imported (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU). The interpreter is slow:
sizes stay small, and chunk and block sizes are forced small so that several chunks, segments and
channel blocks appear anyway.
"""

import os
import subprocess
import sys

import pytest
import torch
from test_scan import make_inputs  # float64 by default

import model.scan_triton as st
from model.scan import selective_scan_ref

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D")
# Relative to the largest reference value of each output (gradients sum over the sequence).
TOL = {
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def test_triton_is_installed_and_usable():
    assert st.triton is not None, f"triton is not installed: {st.INSTALL_HINT}"
    assert st.triton_available(), (
        "Triton cannot run here: no CUDA device, and the kernels were not decorated under the "
        "interpreter (set TRITON_INTERPRET=1 before model.scan_triton is imported)"
    )


def run(fn, inputs, dy, dh):
    """y, final state and the gradients of sum(y * dy) + sum(h * dh) (dy or dh may be None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y, h = fn(*leaves)
    loss = sum((out.double() * w).sum() for out, w in ((y, dy), (h, dh)) if w is not None)
    loss.backward()
    return y.detach(), h.detach(), [None if t is None else t.grad for t in leaves]


def check(inputs, dtype=torch.float32, dy=True, dh=True, seed=0, **plan):
    """Compare the Triton scan (inputs rounded to dtype) with the float64 reference on the same values."""
    inputs = [None if t is None else t.to(DEVICE, dtype) for t in inputs]
    (batch, length, inner), n_state = inputs[0].shape, inputs[2].shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(batch, length, inner, generator=g, dtype=torch.float64).to(DEVICE) if dy else None
    dh = torch.randn(batch, inner, n_state, generator=g, dtype=torch.float64).to(DEVICE) if dh else None
    y, h, grads = run(lambda *a: st._scan(*a, **plan), inputs, dy, dh)
    ref = [None if t is None else t.double() for t in inputs]
    y_ref, h_ref, grads_ref = run(lambda *a: selective_scan_ref(*a, return_final_state=True), ref, dy, dh)

    assert y.dtype == dtype and h.dtype == dtype and h.shape == (batch, inner, n_state)
    pairs = [("y", y, y_ref), ("final state", h, h_ref)]
    pairs += [(f"grad of {n}", a, b) for n, a, b in zip(NAMES, grads, grads_ref) if b is not None]
    for name, got, want in pairs:
        if name.startswith("grad"):
            i = NAMES.index(name.split()[-1])
            assert got.dtype == inputs[i].dtype and got.shape == inputs[i].shape, name
        assert torch.isfinite(got).all(), f"{name} is not finite"
        scale = want.abs().max().clamp(min=1)
        torch.testing.assert_close(got.double() / scale, want / scale, **TOL[dtype], msg=name)


@pytest.mark.parametrize(
    "length, chunk, chunks_per_segment",
    [
        (1, 64, None),  # one token
        (37, 64, None),  # one chunk, shorter than T (the default plan)
        (64, 16, None),  # exactly four chunks, one segment
        (70, 16, 1),  # L not a multiple of T; five segments of one chunk: the three-pass path
        (70, 16, 2),  # segments of two chunks, the last one short
    ],
)
def test_matches_reference_across_chunks_and_segments(length, chunk, chunks_per_segment):
    inputs = make_inputs(length=length, seed=length)
    check(inputs, chunk=chunk, chunks_per_segment=chunks_per_segment)


@pytest.mark.parametrize(
    "batch, inner, n_state, block_e",
    [
        (1, 20, 4, 8),  # E not a multiple of the channel block: three blocks, the last partial
        (1, 32, 16, 16),  # two full blocks, N = 16 (the model's)
        (2, 6, 5, None),  # N not a power of two
        (1, 3, 1, None),  # a single state
    ],
)
def test_matches_reference_across_shapes(batch, inner, n_state, block_e):
    inputs = make_inputs(batch=batch, length=45, inner=inner, n_state=n_state, seed=inner)
    check(inputs, chunk=16, chunks_per_segment=2, block_e=block_e)


def test_without_D():
    inputs = make_inputs(length=30, seed=5)
    inputs[5] = None
    check(inputs, chunk=16, chunks_per_segment=1)


def test_gradient_through_the_final_state_only():
    # y unused: every gradient reaches the inputs through the carry from the final state.
    check(make_inputs(length=50, seed=6), dy=False, chunk=16, chunks_per_segment=1)


def test_non_contiguous_inputs():
    u, delta, A, B, C, D = make_inputs(length=40, inner=8, n_state=4, seed=7)
    # (B, L, E) views of (B, E, L) tensors, (E, N) of (N, E), and a strided D
    u, delta = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (u, delta))
    B, C = (torch.stack([t, t], dim=2)[:, :, 0] for t in (B, C))
    A = A.t().contiguous().t()
    D = torch.stack([D, D], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (u, delta, A, B, C, D))
    check([u, delta, A, B, C, D], chunk=16, chunks_per_segment=1)


def test_strong_decay_underflows_to_finite_values():
    # delta * A down to -400 per step: exp() underflows to 0 in float32.
    inputs = make_inputs(length=60, inner=8, max_step_decay=400.0, seed=8)
    assert (inputs[1][..., None] * inputs[2]).min() < -300
    check(inputs, chunk=16, chunks_per_segment=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    check(make_inputs(length=40, inner=8, seed=9), dtype=dtype, chunk=16, chunks_per_segment=1)


def test_public_function_and_inference_mode():
    inputs = [t.float().to(DEVICE) for t in make_inputs(length=20, seed=10)]
    with torch.no_grad():  # no input needs a gradient: no states are saved
        y, h = st.selective_scan_triton(*inputs, return_final_state=True)
        y_only = st.selective_scan_triton(*inputs)
    y_ref, h_ref = selective_scan_ref(*(t.double() for t in inputs), return_final_state=True)
    torch.testing.assert_close(y.double(), y_ref, **TOL[torch.float32])
    torch.testing.assert_close(h.double(), h_ref, **TOL[torch.float32])
    torch.testing.assert_close(y_only, y, rtol=0, atol=0)


def test_bad_inputs_are_refused_with_a_reason():
    u, delta, A, B, C, D = (t.to(DEVICE) for t in make_inputs(length=5))
    with pytest.raises(TypeError, match="float64"):
        st.selective_scan_triton(u, delta, A, B, C, D)
    u, delta, A, B, C, D = (t.float() for t in (u, delta, A, B, C, D))
    with pytest.raises(ValueError, match="A must be"):
        st.selective_scan_triton(u, delta, A[:, :2].t(), B, C, D)


def test_missing_triton_gives_an_install_hint(monkeypatch):
    monkeypatch.setattr(st, "triton", None)
    assert not st.triton_available()
    u, delta, A, B, C, D = (t.float() for t in make_inputs(length=5))
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[dev\]"):
        st.selective_scan_triton(u, delta, A, B, C, D)


def test_module_imports_without_triton():
    # model/ must import with torch alone; sys.modules[name] = None makes `import triton` fail.
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import model.scan_triton as st\n"
        "assert st.triton is None and not st.triton_available()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_kernels_compile_for_a_gpu(tmp_path):
    # The interpreter runs what the compiler would reject (types, layouts): compile for sm_90 too.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "TRITON_CACHE_DIR": str(tmp_path)
    }
    code = "import model.scan_triton as st; print(len(st.compile_kernels(90)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "16"
