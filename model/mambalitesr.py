"""MambaLiteSR: a Vision-Mamba super-resolution network with low-rank Delta projections.

Reads top to bottom: config, Mamba mixer, Mamba block, residual group, network, build_model.
Axis letters are listed in model/__init__.py.

Structure (seed paper, and the DVMSR code it builds on):
    x - mean -> conv3x3 (3 -> C) = f0
    f0 -> G residual groups [K x (x + Mamba(LayerNorm(x))) -> conv3x3, + group input]
       -> LayerNorm -> conv3x3, + f0 (global skip)
       -> conv3x3 (C -> 3 s^2) -> pixel shuffle(s) -> + mean
Tokens are pixels in row-major order (patch size 1): a 64x64 LR patch is a 4,096-token sequence.

DVMSR's published network (preset "dvmsr", weights imported by model/dvmsr.py) departs from this in
two places, each behind a ModelConfig switch: `embed_norm` (the groups run on LayerNorm(f0), the
global skip still adds f0) and `block_residual=False` (each block returns Mamba(LayerNorm(x))).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.causal_conv import causal_conv1d_silu_fused, causal_conv1d_silu_ref
from model.config import MAX_CHUNK, PRESETS, SCALES, ModelConfig, preset  # noqa: F401 (re-exported)
from model.scan import SelectiveScan

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted at the input and added back (EDSR/DVMSR)


class MambaMixer(nn.Module):
    """Mamba (S6) mixer in plain PyTorch, with the Delta projection factored at rank r."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, E, N, r = cfg.embed_dim, cfg.inner_dim, cfg.d_state, cfg.rank
        self.rank, self.d_state = r, N
        self.in_proj = nn.Linear(C, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(E, r + 2 * N, bias=False)
        self.dt_proj = nn.Linear(r, E, bias=True)  # low-rank Delta: (E x r) x_proj rows, (r x E) here
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, C, bias=False)
        self.ssm = SelectiveScan(cfg.scan, cfg.chunk_size)
        self._init_dt(dt_min=1e-3, dt_max=0.1)

    def _init_dt(self, dt_min: float, dt_max: float) -> None:
        # Mamba's initialisation: softplus(bias) log-uniform in [dt_min, dt_max].
        nn.init.uniform_(self.dt_proj.weight, -(self.rank**-0.5), self.rank**-0.5)
        E = self.dt_proj.bias.shape[0]
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(x)  # (B, L, 2E)
        x, z = xz.chunk(2, dim=-1)  # (B, L, E) each
        # causal depthwise conv + SiLU; the fused scan's kernel library has it too (model/causal_conv.py)
        conv = causal_conv1d_silu_fused if self.ssm.form(x.device) == "fused" else causal_conv1d_silu_ref
        x = conv(x, self.conv1d.weight, self.conv1d.bias)
        dt, B, C = torch.split(self.x_proj(x), [self.rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # (B, L, E)
        A = -torch.exp(self.A_log)  # (E, N)
        y = self.ssm(x, delta, A, B, C, self.D)  # (B, L, E)
        y = y * F.silu(z)
        return self.out_proj(y)  # (B, L, C)


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba layer: x + Mamba(LayerNorm(x)); Mamba(LayerNorm(x)) alone without
    `block_residual` (DVMSR's blocks, see ModelConfig)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.residual = cfg.block_residual
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.mixer = MambaMixer(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mixer(self.norm(x))  # (B, L, C)
        return x + y if self.residual else y


class ResidualGroup(nn.Module):
    """K Mamba blocks over the pixel sequence, then a 3x3 conv, with a skip around the group."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.blocks_per_group))
        self.conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major tokens
        for block in self.blocks:
            t = block(t)
        return self.conv(t.transpose(1, 2).reshape(b, c, h, w)) + x  # (B, C, H, W)


def _norm_channels(norm: nn.LayerNorm, f: torch.Tensor) -> torch.Tensor:
    """A LayerNorm over the channels of each pixel of a (B, C, H, W) feature map."""
    b, c, h, w = f.shape
    return norm(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class MambaLiteSR(nn.Module):
    """The full network: RGB LR image in [0, 1] -> RGB image `scale` times larger."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, s = cfg.embed_dim, cfg.scale
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, C, 3, padding=1)
        # DVMSR's LayerNorm after the first conv (ModelConfig.embed_norm); absent by default
        self.embed_norm = nn.LayerNorm(C) if cfg.embed_norm else None
        self.groups = nn.ModuleList(ResidualGroup(cfg) for _ in range(cfg.n_groups))
        self.norm = nn.LayerNorm(C)
        self.conv_after_body = nn.Conv2d(C, C, 3, padding=1)
        # One-step upsampler (lightweight SR, as DVMSR/SwinIR-light): conv to 3 s^2, pixel shuffle.
        self.upsample = nn.Sequential(nn.Conv2d(C, 3 * s * s, 3, padding=1), nn.PixelShuffle(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.mean
        f0 = self.conv_first(x)  # (B, C, H, W)
        # DVMSR normalises the groups' input but keeps the raw f0 for the global skip below
        f = f0 if self.embed_norm is None else _norm_channels(self.embed_norm, f0)
        for group in self.groups:
            f = group(f)
        f = _norm_channels(self.norm, f)
        f = self.conv_after_body(f) + f0
        return self.upsample(f) + self.mean  # (B, 3, sH, sW)


def build_model(cfg, **overrides) -> nn.Module:
    """Build a network from a config (a ``ModelConfig``, or a ``model.conv.ConvConfig`` for the
    convolutional references) or a preset name ('teacher', 'student', 'tiny', 'dvmsr', or one of
    ``model.conv.CONV_PRESETS``)."""
    from model.conv import CONV_PRESETS, ConvConfig, ConvSR

    if isinstance(cfg, str):
        cfg = CONV_PRESETS[cfg].replace(**overrides) if cfg in CONV_PRESETS else preset(cfg, **overrides)
    elif overrides:
        cfg = cfg.replace(**overrides)
    return ConvSR(cfg) if isinstance(cfg, ConvConfig) else MambaLiteSR(cfg)


def config_from_dict(values: dict):
    """A ModelConfig from a plain dict (YAML, checkpoints), or a ``ConvConfig`` when it names an
    ``arch``; an unknown key is an error naming it."""
    from model.conv import ConvConfig

    kind = ConvConfig if "arch" in values else ModelConfig
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
    return kind(**values)


def load_model(path: str, **overrides) -> nn.Module:
    """Load a network saved as {"model_config": dict, "model": state_dict} (trainers' checkpoints):
    a MambaLiteSR, or a convolutional reference (``model.conv``) when the config names an ``arch``.

    Raises:
        ValueError: the file is not such a checkpoint, or its weights do not fit its config.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise ValueError(
            f"{path} is not a MambaLiteSR checkpoint: expected a dict with 'model_config' and 'model'"
        )
    net = build_model(config_from_dict({**ckpt["model_config"], **overrides}))
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"weights in {path} do not match its model_config: {exc}") from exc
    return net
