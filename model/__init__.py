"""MambaLiteSR: the network, its selective scan, complexity counts, tiled inference, ONNX export.

Imports with torch alone; onnx and onnxruntime are imported only by model/export.py.

Axis letters used in shape comments:
    B  batch                     L  tokens (pixels of an LR image, row-major: L = H * W)
    C  embedding dim             E  Mamba inner width (expand * C)
    N  SSM state size (d_state)  r  rank of the low-rank Delta projection
    H, W  LR image height, width s  upscaling factor
    T  chunk length of the chunked scan   c  number of chunks
"""

from model.complexity import FlopCount, count_flops, count_params
from model.mambalitesr import PRESETS, MambaLiteSR, ModelConfig, build_model, preset
from model.scan import selective_scan
from model.tiling import upscale_tiled

__all__ = [
    "PRESETS",
    "FlopCount",
    "MambaLiteSR",
    "ModelConfig",
    "build_model",
    "count_flops",
    "count_params",
    "preset",
    "selective_scan",
    "upscale_tiled",
]
