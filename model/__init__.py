"""MambaLiteSR: the network, its selective scan, complexity counts, tiled inference, ONNX export.

Imports with torch alone (``model.config`` without it); onnx and onnxruntime are imported only by
model/export.py.

Axis letters used in shape comments:
    B  batch                     L  tokens (pixels of an LR image, row-major: L = H * W)
    C  embedding dim             E  Mamba inner width (expand * C)
    N  SSM state size (d_state)  r  rank of the low-rank Delta projection
    H, W  LR image height, width s  upscaling factor
    T  chunk length of the chunked scan   c  number of chunks
"""

import importlib

# name -> the module that defines it, imported on first use (PEP 562): ``model.config`` and the
# tools that read configurations alone (selection) start without loading torch
_EXPORTS = {
    "FlopCount": "model.complexity",
    "count_flops": "model.complexity",
    "count_params": "model.complexity",
    "PRESETS": "model.config",
    "ModelConfig": "model.config",
    "preset": "model.config",
    "MambaLiteSR": "model.mambalitesr",
    "build_model": "model.mambalitesr",
    "selective_scan": "model.scan",
    "upscale_tiled": "model.tiling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
