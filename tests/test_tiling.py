"""Tiled full-image inference against whole-image inference."""

import pytest
import torch
from torch import nn

from model import build_model, upscale_tiled
from model.tiling import tile_starts


def local_upscaler(scale: int) -> nn.Module:
    """A conv net whose LR receptive field has radius 2: tiling must reproduce it exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(8, 3 * scale * scale, 3, padding=1),
        nn.PixelShuffle(scale),
    )
    return net.eval()


@pytest.mark.parametrize("size", [(64, 64), (100, 77), (150, 130), (64, 200)])
@pytest.mark.parametrize("scale", [2, 4])
def test_tiling_is_exact_for_a_local_operator(size, scale):
    net = local_upscaler(scale)
    img = torch.rand(3, *size)
    with torch.no_grad():
        whole = net(img[None])[0]
    tiled = upscale_tiled(net, img, scale, tile=32, overlap=16, batch_size=5)
    assert tiled.shape == (3, scale * size[0], scale * size[1])
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


def test_tiles_cover_the_image():
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(100, 64, 16) == [0, 36]
    assert tile_starts(150, 64, 16) == [0, 48, 86]
    for size in range(65, 300, 7):
        s = tile_starts(size, 64, 16)
        assert s[0] == 0 and s[-1] + 64 == size
        assert all(b - a <= 48 for a, b in zip(s, s[1:]))  # neighbours overlap by >= 16


def test_small_and_grayscale_images():
    net = local_upscaler(2)
    gray = torch.rand(20, 30)
    out = upscale_tiled(net, gray, 2, tile=32, overlap=8)
    assert out.shape == (1, 40, 60)
    rgb = upscale_tiled(net, gray[None].expand(3, -1, -1), 2, tile=32, overlap=8)
    torch.testing.assert_close(out, rgb.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="shape"):
        upscale_tiled(net, torch.rand(4, 10, 10), 2)
    with pytest.raises(ValueError, match="overlap"):
        upscale_tiled(net, gray, 2, tile=32, overlap=32)


def test_mambalitesr_tiled_close_to_whole_image():
    # The scan reads every earlier pixel of its tile, so tiles cannot match the whole image
    # exactly; for this untrained tiny network the mean difference stays small (docs/benchmarks.md).
    torch.manual_seed(0)
    net = build_model("tiny").eval()
    img = torch.rand(3, 90, 70) * 0.5 + torch.linspace(0, 0.5, 70)
    with torch.no_grad():
        whole = net(img[None])[0]
    tiled = upscale_tiled(net, img, 4, tile=64, overlap=16)
    diff = (tiled - whole).abs()
    assert diff.mean() < 2e-3, f"mean |tiled - whole| = {diff.mean():.2e}"
    assert diff.max() < 0.1, f"max |tiled - whole| = {diff.max():.2e}"
