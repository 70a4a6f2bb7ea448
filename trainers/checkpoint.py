"""Training checkpoints: written atomically, refused clearly when damaged.

A checkpoint is a dict: ``format``, ``model_config`` (ModelConfig fields), ``model`` (state dict),
``optimizer``, ``scheduler``, ``step`` (the next step to run), ``train_config`` and ``metrics``.
``model.load_model`` reads the first two, so a checkpoint is also an exportable model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "mambalitesr-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or not one of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "delete it to start over, or restore a good copy"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    missing = [k for k in ("model_config", "model", "step") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it cannot be resumed")
    return state
