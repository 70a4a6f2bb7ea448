"""Parameter and FLOP counts for any MambaLiteSR config and input size, computed analytically.

FLOPs follow the common convention of 2 per multiply-accumulate for convolutions and linear layers
(biases not counted), which is also what ``torch.utils.flop_counter`` reports. The selective scan
is counted from its equations (model/scan.py), independent of the form that runs it:
per token, channel and state: exp(delta*A) 2 (multiply, exp), delta*u*B 1, h update 2, C*h 2;
per token and channel: delta*u 1, D*u skip 2. Other element-wise work (norms, activations,
residual adds) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from model.mambalitesr import ModelConfig

SCAN_FLOPS_PER_STATE = 7  # per (token, channel, state)
SCAN_FLOPS_PER_CHANNEL = 3  # per (token, channel)


@dataclass(frozen=True)
class FlopCount:
    conv_linear: int  # 2 x MACs of all convolutions and linear layers
    scan: int  # the selective scan's arithmetic, from its equations

    @property
    def total(self) -> int:
        return self.conv_linear + self.scan

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a module (all, or only those that require grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(cfg: ModelConfig, height: int = 64, width: int = 64, batch: int = 1) -> FlopCount:
    """FLOPs of one forward pass on a (batch, 3, height, width) low-resolution input (``cfg`` may
    also be a convolutional reference's ``model.conv.ConvConfig``: no scan)."""
    from model.conv import ConvConfig, conv_flops

    if height <= 0 or width <= 0 or batch <= 0:
        raise ValueError(f"input size must be positive, got batch={batch}, {height}x{width}")
    if isinstance(cfg, ConvConfig):
        return FlopCount(conv_linear=conv_flops(cfg, height, width, batch), scan=0)
    P = batch * height * width  # tokens = pixels
    C, E, N, r, k, s = cfg.embed_dim, cfg.inner_dim, cfg.d_state, cfg.rank, cfg.d_conv, cfg.scale

    def conv3x3(c_in: int, c_out: int) -> int:
        return 2 * P * c_in * c_out * 9

    # The causal depthwise conv computes k - 1 extra outputs per sequence that are then dropped.
    mixer = (
        2 * P * (C * 2 * E + E * (r + 2 * N) + r * E + E * C) + 2 * batch * (height * width + k - 1) * E * k
    )
    scan = P * E * (SCAN_FLOPS_PER_STATE * N + SCAN_FLOPS_PER_CHANNEL)
    conv_linear = (
        conv3x3(3, C)
        + cfg.n_layers * mixer
        + cfg.n_groups * conv3x3(C, C)
        + conv3x3(C, C)
        + conv3x3(C, 3 * s * s)
    )
    return FlopCount(conv_linear=conv_linear, scan=cfg.n_layers * scan)
