"""PSNR/SSIM on the Y channel, and the bicubic baselines of ../shared/data/README.md."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from trainers.data import load_pairs
from trainers.degrade import imresize
from trainers.metrics import psnr, rgb_to_y, ssim


def test_y_channel_endpoints():
    assert rgb_to_y(np.zeros((1, 1, 3), np.uint8))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.full((1, 1, 3), 255, np.uint8))[0, 0] == pytest.approx(235.0)
    assert rgb_to_y(np.array([[[255, 0, 0]]], np.uint8))[0, 0] == pytest.approx(16 + 65.481)


def test_psnr_by_hand():
    ref = np.full((20, 20), 100, np.uint8)
    img = ref.copy()
    img[4:16, 4:16] += 10  # an error of 10 inside the crop only
    # crop 4 leaves a 12x12 window, all of it off by 10: MSE = 100
    assert psnr(img, ref, crop_border=4, y_channel=False) == pytest.approx(10 * np.log10(255**2 / 100))
    # without cropping, 144 of 400 pixels are off: MSE = 36
    assert psnr(img, ref, crop_border=0, y_channel=False) == pytest.approx(10 * np.log10(255**2 / 36))
    assert psnr(ref, ref, 0) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(ref, ref[:10], 0)


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (48, 40)).astype(np.float64)
    img = np.clip(ref + rng.normal(0, 20, ref.shape), 0, 255)
    want = structural_similarity(
        img, ref, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(img, ref, crop_border=0, y_channel=False) == pytest.approx(want, abs=1e-9)
    assert ssim(ref, ref, 0, y_channel=False) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="SSIM needs at least 11x11 pixels after cropping, got \\(10, 36\\)"):
        ssim(img[:14], ref[:14], crop_border=2, y_channel=False)


@pytest.mark.parametrize(
    "set_name,want_psnr,want_ssim",
    [("Set5", 28.42, 0.8104), ("Set14", 26.00, 0.7027), ("BSD100", 25.96, 0.6675)],
)
def test_bicubic_baselines(bench_dir, set_name, want_psnr, want_ssim):
    pairs = load_pairs(bench_dir / set_name, scale=4)
    ps = [psnr(imresize(p.lr, 4), p.hr, 4) for p in pairs]
    ss = [ssim(imresize(p.lr, 4), p.hr, 4) for p in pairs]
    assert abs(np.mean(ps) - want_psnr) <= 0.02, np.mean(ps)
    assert abs(np.mean(ss) - want_ssim) <= 0.002, np.mean(ss)
