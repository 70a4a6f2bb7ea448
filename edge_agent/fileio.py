"""Files must never be half-written under their real name; and checksums.

One helper for every such write in the project (the agent's outbox and caches, checkpoints, ONNX
exports, compiled kernels): :func:`atomic_path` for writers that want a path to write to,
:func:`atomic_write_bytes` for bytes in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; it becomes ``path`` only on success.

    The temporary file lies in a fresh folder beside ``path`` (``.<name>.XXXX.partial/<name>``: the
    same file system, so the rename is atomic) and carries ``path``'s own name, so writers that
    create the file themselves (a compiler's ``-o``, ``onnx.save``) give it the mode they always do
    and writers that go by the extension see the real one. When the block ends cleanly the file
    is fsynced, renamed over ``path``, and the rename fsynced; when it raises, or any of that
    fails, the temporary folder is removed and ``path`` is left as it was.

    Yields:
        The path to write (it does not exist yet).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        tmp = folder / path.name
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a power cut
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so a crash never leaves half a file under ``path``.

    The file is readable by its owner only (mode 0600).
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data to the disk (fsync acts on the inode, whichever fd)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
