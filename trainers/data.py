"""SR image sets and the random patches training draws from them.

Folder layouts:
- paired, DIV2K style: ``ROOT/HR/NAME.png`` with ``ROOT/LR_bicubic/X4/NAMEx4.png``, or
  ``ROOT/DIV2K_train_HR/`` with ``ROOT/DIV2K_train_LR_bicubic/X4/``;
- HR only: any folder of images; LR images are made with MATLAB-style bicubic (trainers/degrade.py).
Without a path, a built-in set of scikit-image's bundled photos is used, split deterministically.

Images are kept in memory as uint8 arrays. Patches for step k depend only on (seed, k), so a run
resumed at step k draws exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_agent.errors import UserError
from trainers.degrade import bicubic_degrade, mod_crop

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BUILTIN_TRAIN = (
    "astronaut.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "moon.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "brick.png",
    "page.png",
)
BUILTIN_VAL = ("chelsea.png", "coffee.png", "camera.png")  # camera is grayscale on purpose
BUILTIN = "builtin"
# The most pixels an image may have: 50 megapixels (an 8660x5773 photo) take 150 MB as uint8 and
# over 1 GB in the float work of bicubic degradation. The header's size is checked before any
# pixel is decoded, so a file that only claims to be huge costs nothing.
MAX_PIXELS = 50_000_000

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A data set or image that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True, eq=False)  # compared by identity: == on the arrays has no single truth value
class ImagePair:
    name: str
    hr: np.ndarray  # (H, W, 3) or (H, W) uint8
    lr: np.ndarray  # (H / s, W / s[, 3]) uint8


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image as uint8 (H, W, 3), or (H, W) when it has a single channel.

    An image whose header announces more than ``max_pixels`` pixels is refused before decoding.

    16-bit images are scaled to 8 bits (v / 257, rounded: 65535 -> 255); Pillow already reads 16-bit
    RGB PNGs as 8-bit RGB. 32-bit integer or float pixels (modes "I", "F") have no defined range and
    are refused, naming the file, rather than clipped.

    Raises:
        DataError: the file cannot be read as an image, is larger than ``max_pixels``, or its pixel
            format is refused.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's warning size is above MAX_PIXELS: the check below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            width, height = im.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise DataError(
                    f"{path} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the "
                    f"{max_pixels / 1e6:g} megapixels an image may have here; downscale it or cut it "
                    "into tiles (nothing of it was decoded)"
                )
            im.load()
            mode = im.mode
            if mode.startswith("I;16"):
                wide = np.asarray(im).astype(np.float64)  # I;16B reads big-endian: astype fixes the order
                arr = np.round(wide / 257.0).astype(np.uint8)
            elif mode in ("I", "F"):
                arr = None
            elif mode in ("L", "1"):
                arr = np.asarray(im.convert("L"))
            else:
                arr = np.asarray(im.convert("RGB"))
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own check, at twice its warning size
        raise DataError(
            f"{path} claims more pixels than Pillow will open ({exc}); downscale it or cut it into tiles"
        ) from exc
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if arr is None:
        raise DataError(
            f"{path} has {'32-bit integer' if mode == 'I' else 'floating-point'} pixels (mode {mode}), whose "
            "range is not defined; save it as an 8- or 16-bit PNG"
        )
    return np.array(arr, copy=True)  # writable: torch.from_numpy needs it


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _layout(root: Path, scale: int) -> tuple[Path, Path | None]:
    """(HR folder, LR folder or None) for the layouts in the module docstring."""
    if (root / "HR").is_dir():
        lr = root / "LR_bicubic" / f"X{scale}"
        return root / "HR", lr if lr.is_dir() else None
    hr_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.endswith("_HR"))
    if len(hr_dirs) == 1:
        lr = root / (hr_dirs[0].name[: -len("_HR")] + "_LR_bicubic") / f"X{scale}"
        return hr_dirs[0], lr if lr.is_dir() else None
    return root, None


def load_pairs(folder: str | Path, scale: int = 4, limit: int | None = None) -> list[ImagePair]:
    """Load an SR set (see the module docstring) as HR/LR pairs.

    Raises:
        DataError: missing or empty folder, an unreadable image, a missing LR partner, or an HR
            image whose size is not exactly ``scale`` times its LR image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist; pass a folder of images or omit it for the built-in set"
        )
    if scale not in (2, 3, 4):
        raise DataError(
            f"scale {scale} is not an SR scale of the protocol (2, 3 or 4); check the model or --scale"
        )
    hr_dir, lr_dir = _layout(root, scale)
    paths = _images_in(hr_dir)[:limit]
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {hr_dir}")
    if lr_dir is None:
        other = sorted(d.name for d in root.glob("*LR_bicubic/X*") if d.is_dir())
        if other:
            raise DataError(
                f"{root} has LR images for {', '.join(other)} but not X{scale}: the model's scale does not "
                "match the data; use a model of that scale, or data with LR images for this one"
            )
        log.warning("%s has no LR images: making them by bicubic downscaling of HR by %d", root, scale)
    pairs = []
    for path in paths:
        hr = load_image(path)
        if lr_dir is None:
            pairs.append(ImagePair(path.stem, mod_crop(hr, scale), bicubic_degrade(hr, scale)))
            continue
        lr_path = lr_dir / f"{path.stem}x{scale}{path.suffix}"
        if not lr_path.exists():
            candidates = [
                p for p in lr_dir.glob(f"{path.stem}x{scale}.*") if p.suffix.lower() in IMAGE_SUFFIXES
            ]
            if not candidates:
                raise DataError(f"no LR image for {path}: expected {lr_path}")
            lr_path = candidates[0]
        lr = load_image(lr_path)
        if hr.shape[:2] != (scale * lr.shape[0], scale * lr.shape[1]):
            raise DataError(
                f"{path} is {hr.shape[1]}x{hr.shape[0]} but its LR image {lr_path} is "
                f"{lr.shape[1]}x{lr.shape[0]}: HR must be exactly {scale}x the LR size"
            )
        if hr.ndim != lr.ndim:
            raise DataError(f"{path} and {lr_path} differ in channel count")
        pairs.append(ImagePair(path.stem, hr, lr))
    return pairs


def builtin_pairs(split: str, scale: int = 4) -> list[ImagePair]:
    """scikit-image's bundled sample photos (no download), degraded with bicubic; 'train' or 'val'."""
    import skimage

    names = {"train": BUILTIN_TRAIN, "val": BUILTIN_VAL}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    folder = Path(skimage.__file__).parent / "data"
    pairs = []
    for name in names:
        hr = load_image(folder / name)
        h, w = hr.shape[:2]
        pairs.append(
            ImagePair(Path(name).stem, hr[: h - h % scale, : w - w % scale], bicubic_degrade(hr, scale))
        )
    return pairs


def load_sets(folders: list[str] | None, split: str, scale: int) -> list[ImagePair]:
    """Pairs from several folders, or the built-in set when ``folders`` is empty or ["builtin"]."""
    if not folders or list(folders) == [BUILTIN]:
        return builtin_pairs(split, scale)
    return [pair for folder in folders for pair in load_pairs(folder, scale)]


def require_measurable(pairs: list[ImagePair], scale: int, what: str = "validation") -> None:
    """Refuse, naming it, an image too small for the metrics (PSNR and SSIM after a border of
    ``scale`` pixels is cropped from each side): found when the set is loaded, not after training.

    Raises:
        DataError: the first image that is too small.
    """
    from trainers.metrics import SSIM_WINDOW

    need = SSIM_WINDOW + 2 * scale
    for pair in pairs:
        h, w = pair.hr.shape[:2]
        if min(h, w) < need:
            raise DataError(
                f"{what} image {pair.name} is {w}x{h}: too small to be measured at x{scale} (SSIM needs "
                f"{SSIM_WINDOW}x{SSIM_WINDOW} pixels once a {scale}-pixel border is cropped, so at least "
                f"{need}x{need}); remove it from the {what} set"
            )


def _rgb_chw(image: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(image)
    if t.dim() == 2:
        t = t[..., None].expand(-1, -1, 3)
    return t.permute(2, 0, 1).contiguous()  # (3, H, W) uint8


class PatchSampler:
    """Random aligned LR/HR patches with flips and 90-degree rotations, reproducible per step."""

    def __init__(
        self, pairs: list[ImagePair], patch_size: int, scale: int, seed: int = 0, augment: bool = True
    ):
        if patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        usable = []
        for p in pairs:
            if min(p.lr.shape[:2]) >= patch_size:
                usable.append(p)
            else:
                log.warning(
                    "skipping %s: its LR image %s is smaller than a %d px patch",
                    p.name,
                    p.lr.shape[:2],
                    patch_size,
                )
        if not usable:
            raise DataError(
                f"no training image has an LR side of at least {patch_size} px; use a smaller patch size"
            )
        self.lr = [_rgb_chw(p.lr) for p in usable]
        self.hr = [_rgb_chw(p.hr) for p in usable]
        self.patch, self.scale, self.seed, self.augment = patch_size, scale, seed, augment

    def __len__(self) -> int:
        return len(self.lr)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(LR (B, 3, P, P), HR (B, 3, sP, sP)), float32 in [0, 1], a function of (seed, step) only."""
        rng = np.random.default_rng([self.seed, step])
        p, s = self.patch, self.scale
        lrs, hrs = [], []
        for _ in range(batch_size):
            i = int(rng.integers(len(self.lr)))
            lr_img, hr_img = self.lr[i], self.hr[i]
            y = int(rng.integers(lr_img.shape[1] - p + 1))
            x = int(rng.integers(lr_img.shape[2] - p + 1))
            lr = lr_img[:, y : y + p, x : x + p]
            hr = hr_img[:, s * y : s * (y + p), s * x : s * (x + p)]
            if self.augment:
                hflip, vflip, rot = rng.integers(2, size=3)
                if hflip:
                    lr, hr = lr.flip(2), hr.flip(2)
                if vflip:
                    lr, hr = lr.flip(1), hr.flip(1)
                if rot:
                    lr, hr = lr.transpose(1, 2), hr.transpose(1, 2)
            lrs.append(lr)
            hrs.append(hr)
        return torch.stack(lrs).float() / 255.0, torch.stack(hrs).float() / 255.0
