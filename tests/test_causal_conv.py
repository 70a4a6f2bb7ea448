"""The fused causal conv1d + SiLU kernel against nn.Conv1d's op (the export path)."""

import pytest
import torch

from model.causal_conv import causal_conv1d_silu_fused, causal_conv1d_silu_ref
from model.scan import fused_available

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    assert fused_available(), "the fused CPU kernel did not build; see the warning above"


def make(batch, length, inner, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, length, 2 * inner, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(inner, 1, k, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(inner, generator=g, dtype=torch.float64).to(dtype)
    return xz, weight, bias


def run(fn, xz, weight, bias, out_weight):
    xz, weight, bias = (t.detach().clone().requires_grad_() for t in (xz, weight, bias))
    x = xz[..., : weight.shape[0]]  # the mixer's view: rows 2E apart
    y = fn(x, weight, bias)
    (y * out_weight).sum().backward()
    return y.detach(), xz.grad, weight.grad, bias.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length,inner,k", [(1, 16, 4), (3, 6, 4), (50, 40, 4), (33, 16, 1), (20, 64, 7)])
def test_fused_matches_conv1d(dtype, length, inner, k):
    xz, weight, bias = make(2, length, inner, k, dtype, seed=length + inner + k)
    out_weight = torch.randn(2, length, inner, dtype=dtype)
    want = run(causal_conv1d_silu_ref, xz, weight, bias, out_weight)
    got = run(causal_conv1d_silu_fused, xz, weight, bias, out_weight)
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.abs().max().clamp(min=1)
        torch.testing.assert_close(a / scale, b / scale, **TOL[dtype], msg=name)
    assert torch.equal(got[1][..., inner:], torch.zeros_like(got[1][..., inner:]))  # the z half


def test_fused_gradcheck_float64():
    xz, weight, bias = make(2, 9, 18, 4, torch.float64, seed=1)
    x = xz[..., :18].detach().requires_grad_()
    inputs = (x, weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(causal_conv1d_silu_fused, inputs, eps=1e-6, atol=1e-8)


def test_contiguous_and_transposed_inputs_agree():
    xz, weight, bias = make(3, 25, 20, 4, torch.float32, seed=2)
    x = xz[..., :20]
    want = causal_conv1d_silu_ref(x, weight, bias)
    for view in (x.contiguous(), x.transpose(1, 2).contiguous().transpose(1, 2)):
        torch.testing.assert_close(causal_conv1d_silu_fused(view, weight, bias), want, **TOL[torch.float32])


def test_same_bits_on_one_and_two_threads():
    xz, weight, bias = make(3, 60, 40, 4, torch.float32, seed=3)
    out_weight = torch.randn(3, 60, 40)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(causal_conv1d_silu_fused, xz, weight, bias, out_weight)
        torch.set_num_threads(2)
        two = run(causal_conv1d_silu_fused, xz, weight, bias, out_weight)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
