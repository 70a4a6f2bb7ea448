"""The chunked (and, on CUDA, mamba-ssm) scan against the sequential reference."""

import pytest
import torch

from model.scan import (
    MAX_CHUNK,
    log_decay_floor,
    mamba_ssm_available,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)

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
