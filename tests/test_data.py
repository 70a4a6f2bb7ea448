"""Data sets: layouts, pairing, augmentation that keeps pairs aligned, bad data."""

import numpy as np
import pytest
import torch

from trainers.data import (
    BUILTIN_TRAIN,
    BUILTIN_VAL,
    DataError,
    ImagePair,
    PatchSampler,
    builtin_pairs,
    load_pairs,
    load_sets,
)

from conftest import write_png


def nearest_pair(rng, h, w, scale, gray=False):
    """HR made by repeating each LR pixel scale x scale times: any aligned patch pair is exact."""
    lr = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1)
    return lr, hr


def paired_folder(root, n=3, scale=4, size=(20, 24), gray_index=None):
    rng = np.random.default_rng(0)
    for i in range(n):
        lr, hr = nearest_pair(rng, *size, scale, gray=i == gray_index)
        write_png(root / "HR" / f"img_{i:03d}.png", hr)
        write_png(root / "LR_bicubic" / f"X{scale}" / f"img_{i:03d}x{scale}.png", lr)
    return root


def test_paired_layout_and_alignment_under_augmentation(tmp_path):
    pairs = load_pairs(paired_folder(tmp_path / "set", gray_index=1), scale=4)
    assert [p.name for p in pairs] == ["img_000", "img_001", "img_002"]
    assert pairs[1].hr.ndim == 2  # grayscale kept as such for evaluation
    sampler = PatchSampler(pairs, patch_size=8, scale=4, seed=3)
    seen_flips = set()
    for step in range(30):
        lr, hr = sampler.batch(step, 4)
        assert lr.shape == (4, 3, 8, 8) and hr.shape == (4, 3, 32, 32)
        assert lr.dtype == torch.float32 and 0 <= lr.min() and lr.max() <= 1
        # each HR patch is its LR patch with every pixel repeated 4x4, whatever the flip/rotation
        torch.testing.assert_close(hr, lr.repeat_interleave(4, 2).repeat_interleave(4, 3))
        seen_flips.add(tuple(lr[0, 0, 0, :2].tolist()))
    assert len(seen_flips) > 5


def test_patches_depend_only_on_seed_and_step(tmp_path):
    pairs = load_pairs(paired_folder(tmp_path / "set"), scale=4)
    a = PatchSampler(pairs, 8, 4, seed=1)
    b = PatchSampler(pairs, 8, 4, seed=1)
    for step in (5, 0, 17):  # any order: no hidden state
        torch.testing.assert_close(a.batch(step, 3), b.batch(step, 3))
    assert not torch.equal(a.batch(1, 3)[0], a.batch(2, 3)[0])
    assert not torch.equal(a.batch(1, 3)[0], PatchSampler(pairs, 8, 4, seed=2).batch(1, 3)[0])


def test_hr_only_folder_and_div2k_names(tmp_path):
    rng = np.random.default_rng(1)
    write_png(tmp_path / "plain" / "a.png", rng.integers(0, 256, (50, 45, 3), dtype=np.uint8))
    pairs = load_pairs(tmp_path / "plain", scale=4)
    assert pairs[0].hr.shape == (48, 44, 3) and pairs[0].lr.shape == (12, 11, 3)
    lr, hr = nearest_pair(rng, 10, 12, 4)
    write_png(tmp_path / "div2k" / "DIV2K_train_HR" / "0001.png", hr)
    write_png(tmp_path / "div2k" / "DIV2K_train_LR_bicubic" / "X4" / "0001x4.png", lr)
    (pair,) = load_pairs(tmp_path / "div2k", scale=4)
    assert np.array_equal(pair.lr, lr) and np.array_equal(pair.hr, hr)


def test_builtin_split_is_deterministic_and_disjoint():
    train, val = builtin_pairs("train"), builtin_pairs("val")
    assert [p.name for p in train] == [n.rsplit(".", 1)[0] for n in BUILTIN_TRAIN]
    assert {p.name for p in train}.isdisjoint(p.name for p in val) and len(val) == len(BUILTIN_VAL)
    assert any(p.hr.ndim == 2 for p in val)
    for p in train + val:
        assert p.hr.shape[:2] == (4 * p.lr.shape[0], 4 * p.lr.shape[1])
    assert [p.name for p in load_sets([], "val", 4)] == [p.name for p in val]


def test_bad_data_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_pairs(tmp_path / "empty")
    bad = paired_folder(tmp_path / "size")
    write_png(bad / "LR_bicubic" / "X4" / "img_001x4.png", np.zeros((21, 24, 3), np.uint8))
    with pytest.raises(DataError, match=r"img_001\.png is 96x80 but .*exactly 4x"):
        load_pairs(bad)
    unreadable = paired_folder(tmp_path / "broken")
    (unreadable / "HR" / "img_002.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"cannot read image .*img_002\.png"):
        load_pairs(unreadable)
    missing = paired_folder(tmp_path / "missing")
    (missing / "LR_bicubic" / "X4" / "img_000x4.png").unlink()
    with pytest.raises(DataError, match=r"no LR image for .*img_000\.png"):
        load_pairs(missing)
    with pytest.raises(DataError, match="smaller patch"):
        PatchSampler(load_pairs(paired_folder(tmp_path / "small")), patch_size=64, scale=4)


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header announces width x height RGB pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


def test_an_image_announcing_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    original = ImageFile.ImageFile.load

    def decode(self):
        assert self.size[0] < 10_000, "the huge image was decoded"
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    root = paired_folder(tmp_path / "huge")
    # 144 megapixels: past the cap, below the size at which Pillow itself refuses to open a file
    (root / "HR" / "img_001.png").write_bytes(png_claiming(12_000, 12_000))
    with pytest.raises(DataError, match=r"img_001\.png is 12000x12000 \(144 megapixels\), more than the 50 "):
        load_pairs(root)
    # far past Pillow's own limit: still one sentence naming the file
    (root / "HR" / "img_001.png").write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(DataError, match=r"img_001\.png claims more pixels than Pillow will open"):
        load_pairs(root)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from trainers.data import load_image

    values = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    got = load_image(path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.round(values / 257).astype(np.uint8))  # 1000 -> 4, not 255

    wide = tmp_path / "int32.tif"
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(wide)
    with pytest.raises(DataError, match="int32.tif.*32-bit integer"):
        load_image(wide)


def test_images_that_share_a_name_are_all_used(caplog):
    """Two folders may hold files of one name (0001.png of two sets): the sampler keeps both, and
    skips a small one by its own size, not by comparing pairs (ImagePair == ImagePair compared the
    arrays and raised "truth value of an array is ambiguous")."""
    rng = np.random.default_rng(0)

    def pair(side: int) -> ImagePair:
        lr, hr = nearest_pair(rng, side, side, 4)
        return ImagePair("0001", hr, lr)

    first, second, small = pair(12), pair(12), pair(6)
    with caplog.at_level("WARNING"):
        sampler = PatchSampler([first, second, small], patch_size=8, scale=4)
    assert len(sampler) == 2
    assert torch.equal(sampler.lr[1], torch.from_numpy(second.lr).permute(2, 0, 1))
    assert [r.getMessage() for r in caplog.records] == [
        "skipping 0001: its LR image (6, 6) is smaller than a 8 px patch"
    ]
