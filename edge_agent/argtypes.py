"""Command-line value checks shared by every CLI of the project (search, training, export, agent).

Each function is an argparse ``type=``: a bad value makes argparse print the flag's name and what
was wrong, with exit code 2 and no traceback, before any work starts. NaN and infinities are
refused everywhere; a number is finite or it is an error.

    p.add_argument("--iterations", type=argtypes.positive_int)
    p.add_argument("--json", type=argtypes.writable_file)
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _bounded(parse: Callable[[str], float], ok: Callable[[float], bool], requirement: str):
    """An argparse type: ``parse`` the text, then refuse values for which ``ok`` is false."""

    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return check


positive_float = _bounded(finite_float, lambda v: v > 0, "greater than 0")
nonnegative_float = _bounded(finite_float, lambda v: v >= 0, "0 or more")
fraction = _bounded(finite_float, lambda v: 0 <= v <= 1, "in [0, 1]")
positive_int = _bounded(whole_number, lambda v: v >= 1, "at least 1")
nonnegative_int = _bounded(whole_number, lambda v: v >= 0, "0 or more")


def _probe(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (None if it can): tried, not guessed from modes,
    since root passes every permission check and /proc refuses files whatever its modes say."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    except OSError as exc:
        return f"cannot create files in {folder} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(name)
    return None


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent  # missing folders are created on write; the first existing one decides
    return p


def writable_problem(path: str | Path) -> str | None:
    """Why a file could not be written at ``path`` (None if it can), checked before any work."""
    p = Path(path).expanduser()
    if p.is_dir():
        return f"{p} is a directory; give a file name"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{p} cannot be written (no permission)"
    folder = _first_existing(p.parent)
    if not folder.is_dir():
        return f"{folder} is not a directory"
    return _probe(folder)


def dir_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an output folder (None if it can)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{p} exists and is not a directory"
    folder = _first_existing(p)
    if not folder.is_dir():
        return f"{folder} is not a directory"
    return _probe(folder)


def _path_type(problem: Callable[[str], str | None]):
    """An argparse type refusing a path for which ``problem`` gives a reason."""

    def check(text: str) -> str:
        why = problem(text)
        if why:
            raise argparse.ArgumentTypeError(why)
        return text

    return check


writable_file = _path_type(writable_problem)  # a file that can be written (its folder may be created)
writable_dir = _path_type(dir_problem)  # a folder that exists and is writable, or can be created
