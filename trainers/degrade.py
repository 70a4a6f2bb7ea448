"""MATLAB-compatible bicubic resizing, the degradation every SR benchmark uses.

MATLAB's ``imresize(I, 1/s, 'bicubic')`` (antialiased when shrinking) made the LR images of
DIV2K, Set5, Set14 and BSD100, and ``imresize(LR, s, 'bicubic')`` gives the bicubic baselines. We
reproduce its arithmetic: Keys' cubic kernel (a = -0.5) stretched by 1/s when shrinking, weights
normalised per output pixel, symmetric (mirror) padding at the borders, one dimension at a time
(rows first for equal scales), and, for uint8 images, rounding to uint8 after each dimension as
MATLAB's imresizemex does. docs/benchmarks.md gives the agreement with the shared LR files.
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """(out_len, in_len) matrix M such that M @ signal resizes a 1-D signal as MATLAB does."""
    kernel_width = 4.0
    if scale < 1 and antialias:
        kernel = lambda x: scale * _cubic(scale * x)  # noqa: E731
        kernel_width /= scale
    else:
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in input coordinates (1-based)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # (out, taps), 1-based input indices
    weights = kernel(u[:, None] - idx)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])  # symmetric padding
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    m = np.zeros((out_len, in_len))
    np.add.at(m, (np.repeat(np.arange(out_len), taps), idx.ravel()), weights.ravel())
    return m


def imresize(image: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) image by ``scale`` like MATLAB's bicubic imresize.

    Output size is ceil(H * scale) x ceil(W * scale). uint8 in, uint8 out (rounded after each
    dimension, as MATLAB); float in, float64 out.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    is_uint8 = image.dtype == np.uint8
    out = image.astype(np.float64)
    h, w = out.shape[:2]
    for axis, length in ((0, h), (1, w)):
        m = resize_matrix(length, int(math.ceil(length * scale)), scale, antialias)
        out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis])), 0, axis)
        if is_uint8:
            out = np.clip(np.round(out), 0, 255)
    return out.astype(np.uint8) if is_uint8 else out


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom and right edges so that height and width are multiples of ``scale``."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def bicubic_degrade(hr: np.ndarray, scale: int) -> np.ndarray:
    """LR image from an HR uint8 image: crop to a multiple of ``scale``, then shrink by 1/scale."""
    return imresize(mod_crop(hr, scale), 1 / scale)
