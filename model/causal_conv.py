"""The mixer's causal depthwise conv1d + SiLU, in two forms with one signature.

    out[b, t, e] = silu(bias[e] + sum_k weight[e, 0, k] * x[b, t - K + 1 + k, e])   (x = 0 before t = 0)

- ``causal_conv1d_silu_ref``: ``nn.Conv1d``'s op on the channels-first transpose, as Mamba writes it.
  The export path (ONNX Conv) and the form for every scan but "fused".
- ``causal_conv1d_silu_fused``: the CPU kernel in model/csrc/selective_scan_cpu.cpp, beside the fused
  scan. It reads x where it lies (channels last, the first half of in_proj's output) and writes one
  contiguous (B, L, E) tensor, where the reference form transposes, copies and runs a slow depthwise
  backward: on a student training step at batch 8 that is about a fifth of the step on 2 cores
  (docs/benchmarks.md). Backward recomputes the pre-activation instead of saving it.

Both take x (B, L, E) (any strides), weight (E, 1, K) and bias (E,), and return (B, L, E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    length, k = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=k - 1, groups=weight.shape[0])
    return F.silu(y[..., :length].transpose(1, 2))  # causal: keep the first L


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x, or a copy, whose channels are contiguous and rows evenly spaced; and that spacing."""
    if x.stride(2) != 1 or x.stride(0) != x.shape[1] * x.stride(1):
        x = x.contiguous()
    return x, x.stride(1)


class _FusedConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        from model.cpu_kernel import call

        x, row = _rows(x)
        batch, length, inner = x.shape
        out = x.new_empty(batch, length, inner)
        call("conv_silu_forward", x, weight, bias, out, batch, length, inner, weight.shape[1], row)
        ctx.save_for_backward(x, weight, bias)
        ctx.row = row
        return out

    @staticmethod
    def backward(ctx, dout):
        from model.cpu_kernel import call

        x, weight, bias = ctx.saved_tensors
        batch, length, inner = x.shape
        k = weight.shape[1]
        dout = dout.to(x.dtype).contiguous()
        dx = x.new_empty(batch, length, inner)
        dw, db = torch.empty_like(weight), torch.empty_like(bias)
        scratch = x.new_empty(batch * inner * (k + 1))
        call(
            "conv_silu_backward", x, weight, bias, dout, dx, dw, db, scratch, batch, length, inner, k, ctx.row
        )
        return dx, dw, db


def causal_conv1d_silu_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The CPU kernel; the reference form where it is not built or x is not on the CPU."""
    from model.cpu_kernel import kernel

    if x.device.type != "cpu" or kernel() is None:
        return causal_conv1d_silu_ref(x, weight, bias)
    ct = torch.promote_types(x.dtype, torch.float32)
    w2 = weight.to(ct).reshape(weight.shape[0], weight.shape[-1]).contiguous()  # (E, K)
    out = _FusedConvSilu.apply(x.to(ct), w2, bias.to(ct).contiguous())
    return out.to(x.dtype)
