"""The network's configuration (``ModelConfig``) and its named presets, without torch: tools that
only read configurations (selection, the search's config checks) import this alone.

``model/mambalitesr.py`` builds the network from a ``ModelConfig``; the scan forms are described in
``model/scan.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SCAN_FORMS = ("auto", "fused", "triton", "chunked", "reference", "mamba_ssm")
MAX_CHUNK = 8  # largest chunk length T of the chunked scan (model/scan.py, "Numerical safety")
SCALES = (2, 3, 4)


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 32  # C: feature width; the search's first knob (student 32, teacher 60)
    n_groups: int = 4  # G: residual groups, each ending in a 3x3 conv and a skip
    blocks_per_group: int = 2  # K: Mamba blocks per group (student 4 x 2 = 8 Mamba layers)
    d_state: int = 16  # N: SSM state size per channel, Mamba's default
    expand: int = 2  # E = expand * C, the mixer's inner width, Mamba's default
    d_conv: int = 4  # causal depthwise conv kernel before the scan, Mamba's default
    rank: int = 2  # r: rank of the Delta path (E x r)(r x E); the paper's student uses 2
    scale: int = 4  # upscaling factor: 2, 3 or 4
    # Scan form for training and PyTorch inference (model/scan.py): "auto" picks triton on CUDA, the
    # fused CPU kernel on the CPU, chunked where neither is available. Export always traces "chunked".
    scan: str = "auto"
    chunk_size: int = MAX_CHUNK  # T of the chunked scan; at most MAX_CHUNK for float32 safety
    # Two switches for DVMSR's published weights (preset "dvmsr", model/dvmsr.py); the defaults are
    # the seed paper's network, and the published weights reproduce DVMSR's figures only with both.
    # A LayerNorm over the channels right after the first conv (DVMSR's `patch_embed.norm`): the
    # groups run on the normalised features, the global skip adds the conv's output before the norm.
    embed_norm: bool = False
    # x + Mamba(LayerNorm(x)) in every block (a pre-norm residual stack, as Vision Mamba). DVMSR's
    # BasicLayer passes x_size into the block's `residual` argument, so its blocks return
    # Mamba(LayerNorm(x)) with no skip; only the group and global skips remain.
    block_residual: bool = True

    def __post_init__(self) -> None:
        for name in (
            "embed_dim",
            "n_groups",
            "blocks_per_group",
            "d_state",
            "expand",
            "d_conv",
            "rank",
            "chunk_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("embed_norm", "block_residual"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {value!r}")
        if self.rank > self.inner_dim:
            raise ValueError(
                f"ModelConfig.rank ({self.rank}) must not exceed the inner width "
                f"expand * embed_dim = {self.inner_dim}"
            )
        if self.scale not in SCALES:
            raise ValueError(f"ModelConfig.scale must be one of {SCALES}, got {self.scale!r}")
        if self.scan not in SCAN_FORMS:
            raise ValueError(f"ModelConfig.scan must be one of {SCAN_FORMS}, got {self.scan!r}")
        if self.chunk_size > MAX_CHUNK:
            raise ValueError(
                f"ModelConfig.chunk_size must be at most {MAX_CHUNK} (got {self.chunk_size}): "
                "larger chunks can overflow exp() in float32"
            )

    @property
    def inner_dim(self) -> int:
        return self.expand * self.embed_dim

    @property
    def n_layers(self) -> int:
        return self.n_groups * self.blocks_per_group

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # C = 60, 16 Mamba layers, r = C / 2: the paper's teacher
    "teacher": ModelConfig(embed_dim=60, n_groups=8, blocks_per_group=2, rank=30),
    # C = 32, 8 Mamba layers, r = 2: the paper's low-rank student
    "student": ModelConfig(embed_dim=32, n_groups=4, blocks_per_group=2, rank=2),
    # small enough for unit tests on a CPU
    "tiny": ModelConfig(embed_dim=8, n_groups=2, blocks_per_group=1, d_state=4, rank=2),
    # C = 60, 8 Mamba layers, r = ceil(60 / 16) = 4 (stock Mamba's dt_rank): DVMSR's published
    # network (its models/team07_DVMSR.py defaults), which its weights need (model/dvmsr.py)
    "dvmsr": ModelConfig(
        embed_dim=60, n_groups=4, blocks_per_group=2, rank=4, embed_norm=True, block_residual=False
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration ('teacher', 'student', 'tiny', 'dvmsr'), optionally with fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
