"""Convolutional reference networks: the plain nets a Mamba student has to beat on a device.

A study answers "which student?"; these answer "is a Vision-Mamba student worth it here at all?".
They are trained by ``trainers.train`` exactly as a student is (same data, loss and recipe; they
start from scratch, as nothing can be inherited from a Mamba teacher) and exported by
``model/export.py`` through the same checks, so that the agent measures them the same way.

Two published shapes, here on RGB (both papers work on luminance only) with the students' input
convention (RGB in [0, 1], the data mean subtracted at the input and added back at the output):

- ``fsrcnn`` (Dong, Loy and Tang, ECCV 2016): a 5x5 conv to ``width`` features, a 1x1 shrink to
  ``shrink``, ``depth`` 3x3 mapping convs, a 1x1 expand back to ``width``, PReLU after each, and a
  9x9 transposed conv with stride ``scale`` to the image. The paper's x4 net: 56, 12, 4.
- ``espcn`` (Shi et al., CVPR 2016): a 5x5 conv to ``width``, a 3x3 conv to ``shrink``, tanh after
  both, a 3x3 conv to 3 x scale^2 channels and a pixel shuffle. The paper's: 64, 32 (``depth`` 0).

And ``bicubic`` (``BICUBIC``): no weights, bicubic interpolation (PyTorch's, the cubic coefficient
-0.75; ONNX Resize in cubic mode), the zero-cost line every learned model must clear.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from model.mambalitesr import RGB_MEAN, SCALES

ARCHS = ("fsrcnn", "espcn", "bicubic")


@dataclass(frozen=True)
class ConvConfig:
    arch: str = "fsrcnn"  # fsrcnn | espcn | bicubic (no weights: width, shrink and depth are 0)
    width: int = 56  # fsrcnn: d, the feature width; espcn: the first layer's width
    shrink: int = 12  # fsrcnn: s, the mapping width; espcn: the second layer's width
    depth: int = 4  # fsrcnn: m, the mapping layers; espcn: 0 (it has none)
    scale: int = 4

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"ConvConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("width", "shrink", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ConvConfig.{name} must be a non-negative integer, got {value!r}")
        if self.arch == "bicubic" and (self.width, self.shrink, self.depth) != (0, 0, 0):
            raise ValueError(
                f"ConvConfig.width, shrink and depth must be 0 for bicubic (it has no layers), got "
                f"{self.width}, {self.shrink}, {self.depth}"
            )
        if self.arch != "bicubic" and (self.width == 0 or self.shrink == 0):
            raise ValueError(f"ConvConfig.width and shrink must be positive, got {self.width}, {self.shrink}")
        if self.arch == "espcn" and self.depth:
            raise ValueError(
                f"ConvConfig.depth must be 0 for espcn (it has no mapping layers), got {self.depth}"
            )
        if self.scale not in SCALES:
            raise ValueError(f"ConvConfig.scale must be one of {SCALES}, got {self.scale!r}")

    def replace(self, **changes) -> ConvConfig:
        return dataclasses.replace(self, **changes)


BICUBIC = ConvConfig("bicubic", 0, 0, 0)  # nothing to train: not a preset of trainers.train
CONV_PRESETS: dict[str, ConvConfig] = {
    "fsrcnn": ConvConfig("fsrcnn", 56, 12, 4),  # the paper's x4 net: 24,683 parameters on RGB
    "espcn": ConvConfig("espcn", 64, 32, 0),  # the paper's: 37,200 parameters on RGB at x4
    # the paper's FSRCNN with its mapping widened (s 12 -> 56) to about the `student` preset's
    # 141,008 parameters: 137,763
    "fsrcnn-student": ConvConfig("fsrcnn", 56, 56, 4),
}


class ConvSR(nn.Module):
    """RGB LR image in [0, 1] -> RGB image ``scale`` times larger, by convolutions only."""

    def __init__(self, cfg: ConvConfig):
        super().__init__()
        self.cfg = cfg
        d, s, m, r = cfg.width, cfg.shrink, cfg.depth, cfg.scale
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        if cfg.arch == "fsrcnn":
            layers = [nn.Conv2d(3, d, 5, padding=2), nn.PReLU(d), nn.Conv2d(d, s, 1), nn.PReLU(s)]
            for _ in range(m):
                layers += [nn.Conv2d(s, s, 3, padding=1), nn.PReLU(s)]
            layers += [nn.Conv2d(s, d, 1), nn.PReLU(d)]
            # output size (H - 1) r - 2 * 4 + 9 + (r - 1) = r H: exactly r times the input
            layers += [nn.ConvTranspose2d(d, 3, 9, stride=r, padding=4, output_padding=r - 1)]
        elif cfg.arch == "bicubic":
            layers = [nn.Upsample(scale_factor=r, mode="bicubic", align_corners=False)]
        else:
            layers = [nn.Conv2d(3, d, 5, padding=2), nn.Tanh(), nn.Conv2d(d, s, 3, padding=1), nn.Tanh()]
            layers += [nn.Conv2d(s, 3 * r * r, 3, padding=1), nn.PixelShuffle(r)]
        self.body = nn.Sequential(*layers)
        if cfg.arch == "fsrcnn":  # the paper's initialisation of the last layer: small, so that
            nn.init.normal_(self.body[-1].weight, std=0.001)  # training starts near a flat image
            nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x - self.mean) + self.mean  # (B, 3, rH, rW)


def conv_flops(cfg: ConvConfig, height: int, width: int, batch: int = 1) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on a (batch, 3, height, width) input."""
    P = batch * height * width
    d, s, m, r = cfg.width, cfg.shrink, cfg.depth, cfg.scale
    if cfg.arch == "fsrcnn":
        # the transposed conv: each input pixel scatters a 9x9 kernel into 3 channels
        macs = P * (25 * 3 * d + d * s + m * 9 * s * s + s * d + 81 * d * 3)
    elif cfg.arch == "espcn":
        macs = P * (25 * 3 * d + 9 * d * s + 9 * s * 3 * r * r)
    else:  # bicubic: a 4x4 neighbourhood weighted for each output value
        macs = P * r * r * 3 * 16
    return 2 * macs
