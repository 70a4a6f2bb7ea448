"""A PyTorch SR network run on whole images: the device it runs on and the uint8 call that training's
validation and samples, and the evaluation of checkpoints (trainers/evaluate.py), all go through.

Here so that trainers/train.py and trainers/evaluate.py share it without importing each other.
"""

from __future__ import annotations

import numpy as np
import torch

from model.mambalitesr import MambaLiteSR
from trainers.metrics import to_uint8


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device that exists here; a ValueError
    saying what to use instead otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    return dev


def super_resolve(net: MambaLiteSR, lr_image: np.ndarray, device: torch.device) -> np.ndarray:
    """Whole-image inference: uint8 (h, w[, 3]) -> uint8 (s h, s w[, 3]); gray goes through RGB.

    The caller puts ``net`` in eval mode (training's validation switches it back afterwards).
    """
    x = torch.from_numpy(lr_image).to(device).float() / 255.0
    gray = x.dim() == 2
    x = (x[None].expand(3, -1, -1) if gray else x.permute(2, 0, 1))[None]  # (1, 3, h, w)
    with torch.no_grad():
        y = net(x)[0].clamp(0, 1)  # (3, s h, s w)
    y = y.mean(0) if gray else y.permute(1, 2, 0)
    return to_uint8(y.float().cpu().numpy())
