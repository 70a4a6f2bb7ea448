"""Training checkpoints: written atomically, refused clearly when damaged.

A checkpoint is a dict: ``format``, ``model_config`` (ModelConfig fields), ``model`` (state dict),
``optimizer``, ``scheduler``, ``step`` (the next step to run), ``train_config`` and ``metrics``.
``model.load_model`` reads the first two, so a checkpoint is also an exportable model.
"""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import Any

import torch

from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write_bytes

FORMAT = "mambalitesr-checkpoint-v1"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used or written; the message says which file and what to do."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that a reader sees either the old file or the whole new one.

    The state is serialised in memory first, then written through ``atomic_write_bytes``: a failed
    write (a full disk included) leaves the old file and no ``*.partial`` behind.

    Raises:
        CheckpointError: the file could not be written (no space, no permission), saying where.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"no space left to write the checkpoint {path}; free some space on that disk "
                "or choose another --out-dir"
            ) from exc
        raise CheckpointError(
            f"cannot write the checkpoint {path}: {exc.strerror or exc}; choose a writable --out-dir"
        ) from exc
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
