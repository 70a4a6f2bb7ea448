"""PSNR and SSIM as SR papers report them: BT.601 Y channel of 8-bit images, `crop_border` pixels
removed from each side (the scale, by convention). Inputs are uint8 (H, W, 3) or (H, W) arrays,
or float arrays already on the 0..255 scale.

SSIM is Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, C1 = (0.01 L)^2,
C2 = (0.03 L)^2 with L = 255, averaged over the valid part of the image (the same as MATLAB's
ssim_index.m used by the SR literature, and BasicSR's calculate_ssim).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.ndimage import correlate1d


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma on the 16..235 scale, float64, from an RGB image on the 0..255 scale."""
    img = image.astype(np.float64)
    if img.ndim == 2:
        return img
    return 16.0 + (65.481 * img[..., 0] + 128.553 * img[..., 1] + 24.966 * img[..., 2]) / 255.0


def _prepare(img: np.ndarray, ref: np.ndarray, crop_border: int, y_channel: bool):
    if img.shape != ref.shape:
        raise ValueError(f"image shapes differ: {img.shape} vs {ref.shape}")
    if y_channel:
        img, ref = rgb_to_y(img), rgb_to_y(ref)
    else:
        img, ref = img.astype(np.float64), ref.astype(np.float64)
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
        ref = ref[crop_border:-crop_border, crop_border:-crop_border]
    return img, ref


def psnr(img: np.ndarray, ref: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """Peak signal-to-noise ratio in dB (peak 255); inf for identical images."""
    img, ref = _prepare(img, ref, crop_border, y_channel)
    mse = np.mean((img - ref) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


SSIM_WINDOW = 11  # the Gaussian window's side: SSIM needs at least this many pixels each way


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    r = len(g) // 2
    out = correlate1d(correlate1d(img, g, axis=0, mode="nearest"), g, axis=1, mode="nearest")
    return out[r:-r, r:-r]  # keep only windows that lie inside the image


def _ssim_2d(img: np.ndarray, ref: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = _gaussian_window()
    mu1, mu2 = _filter_valid(img, g), _filter_valid(ref, g)
    s11 = _filter_valid(img * img, g) - mu1**2
    s22 = _filter_valid(ref * ref, g) - mu2**2
    s12 = _filter_valid(img * ref, g) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return float(ssim_map.mean())


def ssim(img: np.ndarray, ref: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """Structural similarity; on the Y channel by default, else averaged over channels."""
    img, ref = _prepare(img, ref, crop_border, y_channel)
    if min(img.shape[:2]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping, got {img.shape[:2]}"
        )
    if img.ndim == 2:
        return _ssim_2d(img, ref)
    return float(np.mean([_ssim_2d(img[..., c], ref[..., c]) for c in range(img.shape[2])]))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] to uint8 with rounding, as saved images are."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def finite_or_none(value: Any) -> Any:
    """``value`` with each NaN or infinite float in it, at any depth, replaced by None.

    NaN and Infinity are not JSON (``json.dumps`` writes them unless ``allow_nan=False``, and strict
    readers such as jq refuse the file). A resumed run with no steps left has no throughput (NaN),
    and a perfect reconstruction has an infinite PSNR.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value
