"""Evaluate a model on SR test sets with the numbers SR papers report.

    python -m trainers.evaluate --model bicubic --data BENCH/Set5 BENCH/Set14 BENCH/BSD100
    python -m trainers.evaluate --model runs/student/last.pt --data Set5 Set14 --json results.json
    python -m trainers.evaluate --model student.onnx --data Set5
    python -m trainers.evaluate --model models:/mambalitesr-student/3 --data Set5 --tracking-uri URI

MODEL is ``bicubic`` (MATLAB-style bicubic upscaling of the LR image), a training checkpoint
(whole-image inference in PyTorch), an ONNX file (ONNX Runtime through 64x64 tiles, the way the
device runs it), or an MLflow URI (``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``) of either.
PSNR and SSIM are computed on the Y channel, 8-bit, with ``scale`` border pixels cropped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edge_agent import argtypes, errors, preflight
from edge_agent.backends import OrtModel
from edge_agent.contract import credential_problem
from edge_agent.errors import UserError
from edge_agent.mlflow_io import server_errors
from model.mambalitesr import SCALES
from model.runtime import keep_freed_memory
from model.tiling import upscale_tiled
from trainers.checkpoint import CheckpointError
from trainers.data import ImagePair, load_pairs, require_measurable
from trainers.degrade import imresize
from trainers.inference import resolve_device, super_resolve
from trainers.metrics import finite_or_none, psnr, ssim, to_uint8

Upscaler = Callable[[np.ndarray], np.ndarray]  # uint8 LR (h, w[, 3]) -> uint8 SR (s h, s w[, 3])


@dataclass(frozen=True)
class SetResult:
    name: str
    n_images: int
    psnr_y: float
    ssim_y: float
    per_image: dict[str, dict[str, float]]


def bicubic_upscaler(scale: int) -> Upscaler:
    return lambda lr: imresize(lr, scale)


def checkpoint_upscaler(path: str, device: str = "cpu") -> tuple[Upscaler, int]:
    from model.mambalitesr import load_model

    try:
        net = load_model(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    dev = resolve_device(device)
    net.to(dev).eval()
    return (lambda lr: super_resolve(net, lr, dev)), net.cfg.scale


def onnx_upscaler(path: str, overlap: int = 16) -> tuple[Upscaler, int]:
    """Tiled inference with ONNX Runtime; the tile size and scale are read from the graph.

    Raises:
        BackendError: ONNX Runtime cannot load or run the file, or it does not take one float
            (1, 3, H, W) image (edge_agent.backends.OrtModel, shared with the edge agent).
        ValueError: the tiles are not square, or the output is not a x2, x3 or x4 upscaling.
    """
    model = OrtModel(Path(path), providers=["CPUExecutionProvider"])
    n, c, tile_h, tile_w = model.input_shape
    if tile_h != tile_w:
        raise ValueError(f"{path}: expected square (1, 3, P, P) input tiles, got {list(model.input_shape)}")
    out_shape = model.output_shape
    scale = out_shape[2] // tile_h if len(out_shape) == 4 and isinstance(out_shape[2], int) else 0
    if scale not in SCALES or out_shape != (n, 3, scale * tile_h, scale * tile_w):
        raise ValueError(
            f"{path}: output {list(out_shape)} for input {list(model.input_shape)} is not a x2, x3 or x4 "
            "super-resolution of it; export an SR model (python -m model.export)"
        )

    def predict(batch: torch.Tensor) -> torch.Tensor:
        outs = [model.run(t[None].numpy()) for t in batch]  # static batch 1
        return torch.from_numpy(np.concatenate(outs)).float()

    def upscale(lr: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(lr).float() / 255.0
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        y = upscale_tiled(predict, x, scale, tile=tile_h, overlap=min(overlap, tile_h // 2)).clamp(0, 1)
        y = y[0] if lr.ndim == 2 else y.permute(1, 2, 0)
        return to_uint8(y.numpy())

    return upscale, scale


def resolve_model(
    spec: str, scale: int, device: str = "cpu", tracking_uri: str | None = None
) -> tuple[Upscaler, int]:
    """An upscaler and its scale from a MODEL spec (see the module docstring)."""
    from model import dvmsr

    if spec == "bicubic":
        return bicubic_upscaler(scale), scale
    if dvmsr.is_spec(spec):  # DVMSR's published weights, downloaded or a local copy
        return checkpoint_upscaler(str(dvmsr.resolve(spec)), device)
    if "://" in spec or spec.startswith(("models:/", "runs:/")):
        spec = _download(spec, tracking_uri)
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"model {spec} not found: give 'bicubic', a .pt checkpoint, an .onnx file or an MLflow URI"
        )
    if path.is_dir():
        found = sorted(path.rglob("*.onnx")) or sorted(path.rglob("*.pt"))
        if not found:
            raise ValueError(f"no .onnx or .pt file under {path}")
        path = found[0]
    if path.suffix == ".onnx":
        return onnx_upscaler(str(path))
    return checkpoint_upscaler(str(path), device)


def _download(uri: str, tracking_uri: str | None) -> str:
    """A local copy of an MLflow artifact URI; a ``RegistryError`` naming the URI and the server."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with server_errors(mlflow.get_tracking_uri(), f"download {uri}"):
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)


def _device(text: str) -> str:
    """argparse type: a torch device that exists here (the same check as training's --device)."""
    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def evaluate_set(upscale: Upscaler, pairs: list[ImagePair], scale: int, name: str) -> SetResult:
    """PSNR-Y and SSIM-Y (``scale`` border pixels cropped) of each image and their means over the set;
    training's validation (trainers.train.validate) is this too.

    Raises:
        ValueError: an output whose shape is not its HR image's.
    """
    per_image, ps, ss = {}, [], []
    for pair in pairs:
        sr = upscale(pair.lr)
        if sr.shape != pair.hr.shape:
            raise ValueError(f"{name}/{pair.name}: output {sr.shape} does not match HR {pair.hr.shape}")
        ps.append(psnr(sr, pair.hr, scale))
        ss.append(ssim(sr, pair.hr, scale))
        per_image[pair.name] = {"psnr_y": ps[-1], "ssim_y": ss[-1]}
    # the means are over every image: two images with one name (from two folders) share a key above
    return SetResult(
        name=name,
        n_images=len(pairs),
        psnr_y=float(np.mean(ps)),
        ssim_y=float(np.mean(ss)),
        per_image=per_image,
    )


def format_table(model: str, results: list[SetResult]) -> str:
    lines = [f"model: {model}", f"{'set':12s} {'images':>6s} {'PSNR-Y (dB)':>12s} {'SSIM-Y':>8s}"]
    lines += [f"{r.name:12s} {r.n_images:6d} {r.psnr_y:12.2f} {r.ssim_y:8.4f}" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.evaluate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="bicubic, CHECKPOINT.pt, MODEL.onnx, an MLflow URI, dvmsr or dvmsr:PATH",
    )
    p.add_argument(
        "--data", nargs="+", required=True, help="test set folders (HR/ and LR_bicubic/X4/, or HR only)"
    )
    p.add_argument(
        "--scale", type=int, choices=SCALES, default=4, help="for bicubic (models carry their own)"
    )
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:N or auto (checkpoints)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs")
    p.add_argument("--json", type=argtypes.writable_file, help="write per-set and per-image results here")
    args = p.parse_args(argv)
    problem = credential_problem(args.tracking_uri)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.model.startswith(("models:/", "runs:/")) or "://" in args.model:
        preflight.limit_mlflow_retries()  # a dead server is a sentence in seconds, not minutes of retries
        server = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        problem = preflight.study_store_problem(server) if server else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    keep_freed_memory()
    try:
        upscale, scale = resolve_model(args.model, args.scale, args.device, args.tracking_uri)
        sets = [(load_pairs(folder, scale), Path(folder).name) for folder in args.data]
        for pairs, name in sets:  # every image is checked before the first is upscaled
            require_measurable(pairs, scale, name)
        results = [evaluate_set(upscale, pairs, scale, name) for pairs, name in sets]
    except (UserError, ValueError) as exc:
        return errors.fail(exc)
    print(format_table(args.model, results))
    if args.json:
        report = {"model": args.model, "scale": scale, "sets": [asdict(r) for r in results]}
        # a perfect reconstruction has an infinite PSNR, which is not JSON: null
        Path(args.json).write_text(json.dumps(finite_or_none(report), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
