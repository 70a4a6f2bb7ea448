"""Fetch DIV2K and Flickr2K from their official locations into the layout trainers/data.py reads.

    python -m trainers.datasets fetch div2k|flickr2k|df2k --root DIR [--base-url URL]

What ends up under ROOT (``load_pairs(ROOT/DIV2K_train)`` etc. read these as they are):

    ROOT/DIV2K_train/DIV2K_train_HR/0001.png  + DIV2K_train_LR_bicubic/X4/0001x4.png
    ROOT/DIV2K_valid/DIV2K_valid_HR/0801.png  + DIV2K_valid_LR_bicubic/X4/0801x4.png
    ROOT/Flickr2K/Flickr2K_HR/000001.png      + Flickr2K_LR_bicubic/X4/000001x4.png
    ROOT/downloads/                             the archives (kept unless --delete-archives)

Only the HR and bicubic X4 LR folders are extracted (Flickr2K.tar also holds X2, X3 and "unknown"
degradations).

Downloads stream to ``downloads/NAME.part`` and resume with ``Range: bytes=N-`` after a dropped
connection (a few retries with back-off; a server answering 200 to a Range request is started over;
416 means the part is already whole or is thrown away). A file gets its final name only once its size
matches the server's and it verified. Extraction goes to a temp folder inside ROOT, is moved into
place with os.replace, and only then is ``ROOT/<set>/.<archive>.complete`` written (atomically); a set
folder without its marker is extracted again, so a half-extracted folder is never taken for whole.

Verification. No sha256 is pinned: the files could not be downloaded when this was written, so there
is nothing trustworthy to pin (``Archive.sha256`` takes one per file, and is then checked first).
Instead every archive is checked with its own integrity data: its size against the server's
Content-Length, and for a zip the CRC32 of every member (each member read in full); a tar has no
data checksums, so every member is read to its header's size and the archive to its end (tarfile
checks each header's checksum on the way). The CLI prints which checks were made.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write_bytes, sha256_file

CHUNK = 1 << 20
RETRIES = 5  # consecutive failed attempts without new bytes before giving up
RETRY_BACKOFF_S = 1.0  # doubles per consecutive failure; tests set it near 0
TIMEOUT_S = 60.0  # per socket read: a stalled connection counts as a dropped one


class FetchError(UserError, RuntimeError):
    """A download, verification or extraction that failed; the message is one sentence for the user."""


@dataclass(frozen=True)
class Archive:
    name: str  # file name at the base URL and under ROOT/downloads
    target: str  # set folder under ROOT that receives the folders and the marker
    folders: tuple[tuple[str, str], ...]  # (folder in the archive, folder under ROOT) to extract
    sha256: str | None = None  # pin when known; then checked before the archive's own checks
    size: int | None = None  # bytes, when known; a server announcing another size is an error


@dataclass(frozen=True)
class DataSet:
    base_url: str
    archives: tuple[Archive, ...]
    train: tuple[str, ...]  # folders under ROOT for --train-data
    val: tuple[str, ...]  # folders under ROOT for --val-data; empty: the set has no validation split


DIV2K_URL = "http://data.vision.ee.ethz.ch/cvl/DIV2K/"
FLICKR2K_URL = "https://cv.snu.ac.kr/research/EDSR/"


def _div2k(split: str) -> tuple[Archive, ...]:
    target = f"DIV2K_{split}"
    hr, lr = f"{target}_HR", f"{target}_LR_bicubic/X4"
    return (
        Archive(f"{target}_HR.zip", target, ((hr, f"{target}/{hr}"),)),
        Archive(f"{target}_LR_bicubic_X4.zip", target, ((lr, f"{target}/{lr}"),)),
    )


DIV2K = DataSet(DIV2K_URL, _div2k("train") + _div2k("valid"), ("DIV2K_train",), ("DIV2K_valid",))
FLICKR2K = DataSet(
    FLICKR2K_URL,
    (
        Archive(
            "Flickr2K.tar",
            "Flickr2K",
            (
                ("Flickr2K/Flickr2K_HR", "Flickr2K/Flickr2K_HR"),
                ("Flickr2K/Flickr2K_LR_bicubic/X4", "Flickr2K/Flickr2K_LR_bicubic/X4"),
            ),
        ),
    ),
    ("Flickr2K",),
    (),
)
SETS = {"div2k": (DIV2K,), "flickr2k": (FLICKR2K,), "df2k": (DIV2K, FLICKR2K)}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _disk_full(path: Path, needed: int | None) -> FetchError:
    free = shutil.disk_usage(path).free
    need = f"{_human(needed)} more were needed, " if needed else ""
    return FetchError(
        f"the disk holding {path} is full ({need}{_human(free)} free): free space or pass another --root"
    )


def _progress(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )


def _total_from_content_range(value: str | None) -> int | None:
    """The total of ``bytes a-b/total`` or ``bytes */total``; None when absent or ``*``."""
    if not value or "/" not in value:
        return None
    tail = value.rsplit("/", 1)[1].strip()
    return int(tail) if tail.isdigit() else None


def download(url: str, dest: Path, expected_size: int | None = None, progress: bool = True) -> int:
    """Download ``url`` to ``dest.part`` (``dest`` plus ``.part``), resuming what is already there.

    The caller verifies the part and renames it; this only guarantees its size is the server's.

    Returns:
        The size in bytes.

    Raises:
        FetchError: 404 or another client error, disk full, or still failing after RETRIES attempts.
    """
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    failures, last_error = 0, ""
    while True:
        offset = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        gained, total = 0, None
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                if response.status == 206:
                    total = _total_from_content_range(response.headers.get("Content-Range"))
                    start = response.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
                    if start != str(offset):  # a range we did not ask for: start over
                        part.unlink()
                        raise http.client.HTTPException(f"asked for bytes {offset}- but got {start}-")
                else:  # 200: the server ignored the Range header, so the body is the whole file
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    offset = 0
                if expected_size is not None and total is not None and total != expected_size:
                    raise FetchError(
                        f"{url} is {total} bytes but {expected_size} were expected: the file has changed; "
                        "pass another location with --base-url or update the table in trainers/datasets.py"
                    )
                if total is not None and total - offset > shutil.disk_usage(part.parent).free:
                    raise _disk_full(part.parent, total - offset)
                with (
                    open(part, "r+b" if offset else "wb") as f,
                    _progress(total, offset, dest.name, progress) as bar,
                ):
                    f.seek(offset)
                    f.truncate()
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        gained += len(block)
                        bar.update(len(block))
            size = part.stat().st_size
            if total is None or size == total:
                return size
            if size > total:
                part.unlink()
            last_error = f"connection closed after {size} of {total} bytes"
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # nothing left past our offset: whole already, or longer than the file
                total = _total_from_content_range(exc.headers.get("Content-Range"))
                if total is not None and offset == total:
                    return total
                part.unlink(missing_ok=True)
                last_error = "HTTP 416 for a partial file larger than the server's"
            elif exc.code == 404:
                raise FetchError(
                    f"{url} was not found (HTTP 404): the file may have moved; pass the folder that now "
                    "holds it with --base-url"
                ) from None
            elif exc.code < 500:
                raise FetchError(f"{url} was refused (HTTP {exc.code} {exc.reason}); check the URL") from None
            else:
                last_error = f"HTTP {exc.code} {exc.reason}"
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(part.parent, (total - offset - gained) if total else None) from None
            if not isinstance(exc, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError)):
                raise
            last_error = str(getattr(exc, "reason", exc))
        except http.client.HTTPException as exc:  # IncompleteRead and friends: a dropped connection
            last_error = f"{type(exc).__name__}: {exc}"
        failures = 0 if gained else failures + 1
        if failures >= RETRIES:
            raise FetchError(
                f"downloading {url} failed {RETRIES} times in a row ({last_error}); run again to resume"
            )
        print(f"{dest.name}: {last_error}; retrying", file=sys.stderr)
        time.sleep(RETRY_BACKOFF_S * 2 ** max(failures - 1, 0))


def verify(path: Path, sha256: str | None = None) -> str:
    """Check an archive with its pinned sha256 (if any) and its own integrity data.

    Returns:
        What was checked, for the user.

    Raises:
        FetchError: a check failed.
    """
    checks = []
    if sha256 is not None:
        if sha256_file(path) != sha256.lower():
            raise FetchError(f"{path.name} does not match its pinned sha256")
        checks.append("pinned sha256")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()  # reads every member, checking its CRC32
            if bad is not None:
                raise FetchError(f"{path.name} is corrupt: the CRC of member {bad} does not match")
            checks.append("size + CRC of every member")
        else:
            with tarfile.open(path, "r:*") as tf:
                for member in tf:
                    if member.isfile():
                        data = tf.extractfile(member)
                        n = sum(len(b) for b in iter(lambda d=data: d.read(CHUNK), b""))
                        if n != member.size:
                            raise FetchError(f"{path.name} is corrupt: member {member.name} is truncated")
            checks.append("size + size of every member (tar has no checksums)")
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as exc:
        raise FetchError(f"{path.name} is corrupt ({exc})") from None
    if sha256 is None:
        checks.append("no pinned sha256")
    return "; ".join(checks)


def _members(path: Path):
    """(name, is_dir, size, open) for each member of a zip or tar."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                yield info.filename, info.is_dir(), info.file_size, lambda i=info: zf.open(i)
    else:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isdir() or m.isfile():  # links and devices are never extracted
                    yield m.name, m.isdir(), m.size, lambda m=m: tf.extractfile(m)


def extract(path: Path, archive: Archive, root: Path, progress: bool = True) -> None:
    """Extract ``archive.folders`` from ``path`` into ROOT via a temp folder, then write the marker.

    Raises:
        FetchError: the archive lacks an expected folder, has an unsafe member name, or the disk is full.
    """
    for stale in root.glob(f".extract-{archive.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".extract-{archive.name}-"))
    count, needed = 0, 0
    try:
        with _progress(None, 0, f"extract {archive.name}", progress) as bar:
            for name, is_dir, size, open_member in _members(path):
                parts = PurePosixPath(name).parts
                if PurePosixPath(name).is_absolute() or ".." in parts:
                    raise FetchError(f"{path.name} has an unsafe member name {name!r}; it was not extracted")
                for inside, under_root in archive.folders:
                    prefix = PurePosixPath(inside).parts
                    if parts[: len(prefix)] == prefix:
                        out = tmp.joinpath(under_root, *parts[len(prefix) :])
                        break
                else:
                    continue
                if is_dir:
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                needed += size
                with open_member() as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                count += 1
                bar.update(size)
        for inside, under_root in archive.folders:
            if not (tmp / under_root).is_dir():
                raise FetchError(
                    f"{path.name} has no folder {inside}/: it is not in the layout this tool knows; "
                    "check the file or update the table in trainers/datasets.py"
                )
            dest = root / under_root
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():  # left by an extraction that did not finish
                shutil.rmtree(dest)
            os.replace(tmp / under_root, dest)
        marker = {"archive": archive.name, "files": count, "bytes": needed}
        atomic_write_bytes(_marker(root, archive), json.dumps(marker).encode())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _disk_full(root, None) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _marker(root: Path, archive: Archive) -> Path:
    return root / archive.target / f".{archive.name}.complete"


def fetch_archive(
    archive: Archive, root: Path, base_url: str, progress: bool = True, delete_archive: bool = False
) -> str | None:
    """Download, verify and extract one archive unless its marker says it is already in place.

    Returns:
        What was done and what verification checked, or None when nothing had to be done.

    Raises:
        FetchError: see download, verify and extract.
    """
    if _marker(root, archive).is_file():
        return None
    dest = root / "downloads" / archive.name
    checks = "extracted again from the archive verified at download (only verified files get its name)"
    if not dest.is_file():
        url = base_url.rstrip("/") + "/" + archive.name
        download(url, dest, archive.size, progress)
        part = dest.with_name(dest.name + ".part")
        try:
            checks = "verified: " + verify(part, archive.sha256)
        except FetchError as exc:
            part.unlink(missing_ok=True)
            raise FetchError(
                f"{str(exc).rstrip('.')}; the file was deleted, run again to download it anew"
            ) from None
        os.replace(part, dest)
    extract(dest, archive, root, progress)
    if delete_archive:
        dest.unlink()
    return checks


def fetch(
    name: str,
    root: str | Path,
    base_url: str | None = None,
    progress: bool = True,
    delete_archives: bool = False,
) -> dict[str, str | None]:
    """Fetch ``div2k``, ``flickr2k`` or ``df2k`` into ``root``.

    Args:
        base_url: replaces each set's official folder URL (a mirror, or a test server).

    Returns:
        For each archive, what was done and checked (None: already in place, nothing done).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = {}
    for data_set in SETS[name]:
        for archive in data_set.archives:
            done[archive.name] = fetch_archive(
                archive, root, base_url or data_set.base_url, progress, delete_archives
            )
    return done


def usage_lines(name: str, root: Path) -> list[str]:
    """How to pass the fetched folders to trainers.train and to a search config."""
    train = [str(root / f) for s in SETS[name] for f in s.train]
    val = [str(root / f) for s in SETS[name] for f in s.val]
    lines = ["train with:", "  python -m trainers.train --train-data " + " ".join(train)]
    if val:
        lines[-1] += " --val-data " + " ".join(val)
    lines += ["search config:", "  training:", f"    train_data: [{', '.join(train)}]"]
    if val:
        lines.append(f"    val_data: [{', '.join(val)}]")
    else:
        lines.append(
            f"  ({name} has no validation split: omit val_data for the built-in images, or fetch div2k)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.datasets", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, verify and extract a data set")
    f.add_argument("name", choices=sorted(SETS))
    f.add_argument("--root", required=True, type=Path, help="folder that receives the data sets")
    f.add_argument("--base-url", help="folder URL to download the archives from instead of the official one")
    f.add_argument("--delete-archives", action="store_true", help="delete each archive once extracted")
    f.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = p.parse_args(argv)
    root = args.root.resolve()
    try:
        done = fetch(args.name, root, args.base_url, not args.no_progress, args.delete_archives)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for archive, checks in done.items():
        print(f"{archive}: " + ("already in place" if checks is None else checks))
    print("\n".join(usage_lines(args.name, root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
