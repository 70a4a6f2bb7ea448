"""Full-image inference through fixed-size tiles, blended where they overlap.

The deployed network takes one static 64x64 LR patch (model/export.py), so any H x W image is
covered by overlapping tiles whose outputs are stitched with weights that are zero in a margin
next to each inner tile edge and ramp linearly to one across the rest of the overlap. For an
operator whose receptive field fits in that margin, tiled and whole-image outputs are identical
(tests check this). MambaLiteSR's scan sees every earlier pixel of its input, so for it the two
differ a little everywhere, not only at seams: docs/benchmarks.md gives the measured difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Predict = Callable[[torch.Tensor], torch.Tensor]  # (n, 3, P, P) -> (n, 3, sP, sP)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, size); the last tile is aligned to the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _axis_weights(tile: int, overlap: int, margin: int, first: bool, last: bool) -> torch.Tensor:
    """1-D blending weights of one tile; edges that lie on the image border keep weight 1."""
    w = torch.ones(tile, dtype=torch.float64)
    ramp_len = max(overlap - 2 * margin, 1)
    ramp = (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len
    head = torch.cat([torch.zeros(margin, dtype=torch.float64), ramp])[:tile]
    if not first:
        w[: head.numel()] = head
    if not last:
        w[tile - head.numel() :] = torch.minimum(w[tile - head.numel() :], head.flip(0))
    return w


def upscale_tiled(
    predict: Predict,
    image: torch.Tensor,
    scale: int,
    tile: int = 64,
    overlap: int = 16,
    batch_size: int = 16,
) -> torch.Tensor:
    """Upscale one image of any size through tile x tile patches.

    Args:
        predict: maps a batch (n, 3, tile, tile) to (n, 3, scale*tile, scale*tile); a torch module
            in eval mode, or a wrapper around an ONNX Runtime session.
        image: (H, W), (1, H, W) or (3, H, W), values in [0, 1]. Single-channel images are
            replicated to RGB and the output averaged back to one channel.
        scale: the network's upscaling factor.
        tile: LR tile size (the exported model's static input size).
        overlap: LR pixels shared by neighbouring tiles; a quarter of it on each side of a seam is
            discarded, the rest is cross-faded.
    Returns:
        (C, scale*H, scale*W) with the input's channel count.
    """
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"expected an image of shape (H, W), (1, H, W) or (3, H, W), got {tuple(image.shape)}"
        )
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    gray = image.shape[0] == 1
    rgb = image.expand(3, -1, -1) if gray else image
    _, H, W = rgb.shape
    # Images smaller than a tile are padded by edge replication, then cropped back.
    pad_h, pad_w = max(tile - H, 0), max(tile - W, 0)
    if pad_h or pad_w:
        rgb = F.pad(rgb[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
    Hp, Wp = rgb.shape[1:]

    ys, xs = tile_starts(Hp, tile, overlap), tile_starts(Wp, tile, overlap)
    margin = overlap // 4
    out = torch.zeros(3, scale * Hp, scale * Wp, dtype=torch.float64)
    weight = torch.zeros(1, scale * Hp, scale * Wp, dtype=torch.float64)
    boxes = [(y, x) for y in ys for x in xs]
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        batch = torch.stack([rgb[:, y : y + tile, x : x + tile] for y, x in chunk])
        with torch.no_grad():
            sr = predict(batch).to(torch.float64)  # (n, 3, sP, sP)
        for (y, x), patch in zip(chunk, sr):
            wy = _axis_weights(scale * tile, scale * overlap, scale * margin, y == ys[0], y == ys[-1])
            wx = _axis_weights(scale * tile, scale * overlap, scale * margin, x == xs[0], x == xs[-1])
            w = wy[:, None] * wx[None, :]
            sy, sx = scale * y, scale * x
            out[:, sy : sy + scale * tile, sx : sx + scale * tile] += patch * w
            weight[:, sy : sy + scale * tile, sx : sx + scale * tile] += w
    out = (out / weight)[:, : scale * H, : scale * W].to(image.dtype)
    return out.mean(0, keepdim=True) if gray else out
