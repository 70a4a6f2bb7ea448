"""DVMSR's published weights as a MambaLiteSR checkpoint: the project's default teacher.

    python -m model.dvmsr PATH/team07_DVMSR.pth --out teacher.pt
    python -m model.dvmsr PATH/DVMSR.pth --key params_ema --out teacher.pt
    python -m model.dvmsr dvmsr --out teacher.pt       # download the pinned file first

DVMSR (Lei, Zhang and Cao, "DVMSR: Distillated Vision Mamba for Efficient Super-Resolution",
CVPRW 2024; code and weights at github.com/nathan66666/DVMSR, MIT licence) is the network
MambaLiteSR builds on. Its weights run in our network with the preset "dvmsr" (model/mambalitesr.py:
a LayerNorm after the first conv, no per-block residual); only the key names differ.

Two published files: ``team07_DVMSR.pth``, a plain state_dict, and
``DVMSR.pth``, BasicSR's ``{"params": ..., "params_ema": ...}``. They hold two different trainings,
not one in two formats (tensors differ by 1.4 in the median, A_log and D by up to 12). The plain file
is the one that reproduces the published Set5 x4 PSNR-Y of 32.19 dB (Y channel, border 4,
whole-image inference): 32.184 dB here. DVMSR.pth gives 32.215 dB with either params_ema or params,
a little above the published figure, outside its +-0.02 dB. So ``dvmsr`` means team07_DVMSR.pth.

Model specs, for wherever a model or a teacher is named (``resolve``):
    dvmsr        the pinned team07_DVMSR.pth, downloaded once into the user cache and checked
                 against its sha256; or the local copy that $MAMBALITESR_DVMSR_WEIGHTS names
    dvmsr:PATH   a local copy of a published file (for machines without internet)
Either gives the path of a project checkpoint ({"model_config", "model"}, model.load_model) in the
user cache ($MAMBALITESR_CACHE_DIR, else $XDG_CACHE_HOME/mambalitesr or ~/.cache/mambalitesr, under
dvmsr/), converted afresh on each call (well under a second) so that it never lags behind the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

from edge_agent import argtypes, errors
from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write_bytes, sha256_file
from model.mambalitesr import build_model, preset

SPEC = "dvmsr"
ENV_WEIGHTS = "MAMBALITESR_DVMSR_WEIGHTS"  # a local copy of the published file, used instead of a download
COMMIT = "86663ce906aab91c31ee5bf69bebc1ad61537405"  # nathan66666/DVMSR, the weights' pinned commit
SHA256 = {
    "team07_DVMSR.pth": "37ff9ece556b84e2aa63533d0d1a0ee27ab63cc6a46d4df8f6bfa16e325d34fe",
    "DVMSR.pth": "b9993f169da81ee63c4b5d4fc770c2f05a4af1e9481aa18a16577fe78fb6f174",
}
DEFAULT_FILE = "team07_DVMSR.pth"  # the one that reproduces the published 32.19 dB (module docstring)
BASICSR_KEYS = ("params_ema", "params")  # BasicSR's test default first
TIMEOUT_S = 60.0  # per network read; a dead connection is an error, not a hang


def url_for(name: str = DEFAULT_FILE) -> str:
    """Where a published file is downloaded from (GitHub, at the pinned commit)."""
    return f"https://github.com/nathan66666/DVMSR/raw/{COMMIT}/model_zoo/{name}"


class DVMSRError(UserError, ValueError):
    """A DVMSR weights file that cannot be used or fetched; the message says which and what to do."""


def is_spec(text: str) -> bool:
    """Whether a model/teacher argument names DVMSR's weights (``dvmsr`` or ``dvmsr:PATH``)."""
    return text == SPEC or text.startswith(SPEC + ":")


def cache_dir() -> Path:
    """The user cache's dvmsr/ folder: beside the CPU kernel builds, under the same variables."""
    from model.cpu_kernel import cache_dir as kernel_cache_dir

    return kernel_cache_dir().parent / "dvmsr"


# --- key names: ours -> DVMSR's (its models/team07_DVMSR.py) --------------------------------------

_PUBLISHED_NAMES = (
    (re.compile(r"^embed_norm\."), "patch_embed.norm."),
    (re.compile(r"^groups\.(\d+)\.blocks\."), r"layers.\1.residual_group.blocks."),
    (re.compile(r"^groups\.(\d+)\.conv\."), r"layers.\1.conv."),
    (re.compile(r"^norm\."), "norm_f."),
)


def published_name(key: str) -> str:
    """DVMSR's name for one of our state-dict keys (conv_first, conv_after_body, upsample agree)."""
    for pattern, replacement in _PUBLISHED_NAMES:
        name, n = pattern.subn(replacement, key)
        if n:
            return name
    return key


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def to_project_state(weights: dict[str, torch.Tensor], source: str = "the file") -> dict[str, torch.Tensor]:
    """DVMSR's state dict renamed to the "dvmsr" preset's keys.

    Raises:
        DVMSRError: keys missing or extra, or tensors of the wrong shape, each named (in DVMSR's
            naming).
    """
    reference = build_model("dvmsr").state_dict()
    expected = {published_name(k): k for k in reference}
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(reference[ours].shape)})"
        for k, ours in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(reference[ours].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_names(extra)}")
    if shapes:
        problems.append(f"wrong shapes: {_names(shapes)}")
    if problems:
        raise DVMSRError(
            f"{source} is not DVMSR's x4 network (C 60, 4 x 2 blocks): {'; '.join(problems)}. "
            f"Use one of the published files {sorted(SHA256)}"
        )
    return {ours: weights[k].detach().to(torch.float32).clone() for k, ours in expected.items()}


def read_published(path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a published file and where they were found in it.

    Args:
        path: ``team07_DVMSR.pth`` (a plain state_dict) or ``DVMSR.pth`` (BasicSR's
            ``{"params", "params_ema"}``).
        key: for a BasicSR file, which weights to take (default ``params_ema``); must be None for a
            plain one.
    Returns:
        (state dict in DVMSR's naming, "state_dict" or the BasicSR key used).
    Raises:
        DVMSRError: unreadable file, not a dict of tensors, or a ``key`` the file lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise DVMSRError(f"no DVMSR weights file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DVMSRError(
            f"cannot read {path} as a PyTorch weights file ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DVMSRError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    if "model_config" in obj and "model" in obj:
        raise DVMSRError(f"{path} is already a MambaLiteSR checkpoint; load it as a checkpoint, not as DVMSR")
    basicsr = [k for k in BASICSR_KEYS if isinstance(obj.get(k), dict)]
    if basicsr:
        chosen = key or basicsr[0]
        if chosen not in basicsr:
            raise DVMSRError(f"{path} has no {chosen!r} weights; it has {basicsr}")
        obj = obj[chosen]
    elif key is not None:
        raise DVMSRError(f"{path} is a plain state_dict; --key {key} applies only to BasicSR files")
    else:
        chosen = "state_dict"
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise DVMSRError(f"{path}: entries that are not tensors: {_names([str(k) for k in odd])}")
    return obj, chosen


def import_weights(src: str | Path, out: str | Path, key: str | None = None) -> Path:
    """Convert a published DVMSR file into a project checkpoint at ``out`` (written atomically).

    The checkpoint holds ``model_config`` (the "dvmsr" preset), ``model`` (our key names) and
    ``source`` (file name, sha256, which weights), so ``model.load_model`` and every consumer of
    trainers' checkpoints read it.

    Raises:
        DVMSRError: the file is not one of DVMSR's (see ``read_published``, ``to_project_state``).
    """
    src, out = Path(src), Path(out)
    weights, chosen = read_published(src, key)
    state = to_project_state(weights, str(src))
    cfg = preset("dvmsr")
    build_model(cfg).load_state_dict(state)  # strict: an internal check that the renaming is complete
    buf = io.BytesIO()
    source = {
        "file": src.name,
        "sha256": sha256_file(src),
        "weights": chosen,
        "repository": "nathan66666/DVMSR",
    }
    torch.save({"model_config": dataclasses.asdict(cfg), "model": state, "source": source}, buf)
    atomic_write_bytes(out, buf.getvalue())
    return out


# --- download ----------------------------------------------------------------------------------------


def download(url: str, dest: Path, sha256: str, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest``, which appears only whole and only with the expected sha256.

    The bytes (a few MB) are read in chunks under a progress bar on stderr, hashed as they come, and
    written with ``atomic_write_bytes``: an interrupted or corrupt download leaves nothing at ``dest``.

    Raises:
        DVMSRError: the server cannot be reached or answers with an error, or the sha256 differs.
    """
    from tqdm import tqdm

    digest, data = hashlib.sha256(), bytearray()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr, disable=not progress
            ) as bar:
                while chunk := response.read(1 << 16):
                    digest.update(chunk)
                    data += chunk
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DVMSRError(
            f"cannot download {url} ({reason}); without internet, give a local copy as "
            f"dvmsr:PATH or set {ENV_WEIGHTS}"
        ) from exc
    got = digest.hexdigest()
    if got != sha256:
        raise DVMSRError(
            f"the download from {url} has sha256 {got}, not the pinned {sha256}; it was deleted "
            f"(nothing was saved at {dest}). Check the URL, or give a verified local copy as dvmsr:PATH"
        )
    atomic_write_bytes(dest, bytes(data))
    return dest


def fetch_published(
    name: str = DEFAULT_FILE, url: str | None = None, cache: Path | None = None, progress: bool = True
) -> Path:
    """The cached copy of a published file, downloaded (and verified) if it is not there yet.

    A cached copy whose sha256 is wrong (damaged, or replaced) is deleted, said so on stderr, and
    downloaded again.
    """
    dest = (cache or cache_dir()) / name
    if dest.is_file():
        if sha256_file(dest) == SHA256[name]:
            return dest
        print(f"{dest} does not have the pinned sha256; deleted it, downloading again", file=sys.stderr)
        dest.unlink()
    return download(url or url_for(name), dest, SHA256[name], progress)


def resolve(
    spec: str,
    key: str | None = None,
    url: str | None = None,
    cache: Path | None = None,
    progress: bool = True,
) -> Path:
    """The project checkpoint for a ``dvmsr`` or ``dvmsr:PATH`` spec (see the module docstring).

    Args:
        spec: ``dvmsr`` (the pinned file: $MAMBALITESR_DVMSR_WEIGHTS if set, else downloaded) or
            ``dvmsr:PATH`` (a local copy of a published file).
        key: which weights of a BasicSR file (default ``params_ema``).
        url: download from here instead of GitHub (a mirror; tests use a local server).
        cache: the folder for downloads and converted checkpoints (default ``cache_dir()``).
        progress: show a progress bar on stderr while downloading.
    Returns:
        Path of a checkpoint that ``model.load_model`` reads (one per source file and ``key``).
    Raises:
        DVMSRError: not a dvmsr spec, a missing or wrong file, or a failed download.
    """
    cache = Path(cache) if cache else cache_dir()
    if spec == SPEC:
        local = os.environ.get(ENV_WEIGHTS)
        if local and not Path(local).is_file():
            raise DVMSRError(f"${ENV_WEIGHTS} names {local}, which is not a file; fix it or unset it")
        src = Path(local) if local else fetch_published(DEFAULT_FILE, url, cache, progress)
    elif spec.startswith(SPEC + ":") and spec[len(SPEC) + 1 :]:
        src = Path(spec[len(SPEC) + 1 :]).expanduser()
    else:
        raise DVMSRError(f"{spec!r} is not a DVMSR spec: give 'dvmsr' or 'dvmsr:PATH'")
    if not src.is_file():
        raise DVMSRError(f"no DVMSR weights file at {src} (from {spec!r})")
    digest = sha256_file(src)
    if digest not in SHA256.values():
        print(
            f"note: {src} (sha256 {digest[:12]}...) is not one of DVMSR's published files; using it anyway",
            file=sys.stderr,
        )
    return import_weights(src, cache / f"{src.stem}-{digest[:16]}-{key or 'default'}.pt", key)


# --- command line ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.dvmsr", description=__doc__.split("\n")[0])
    p.add_argument(
        "src",
        help=f"a published DVMSR .pth file ({', '.join(sorted(SHA256))}), or 'dvmsr' to download it",
    )
    p.add_argument("--out", required=True, type=argtypes.writable_file, help="the checkpoint to write (.pt)")
    p.add_argument("--key", choices=BASICSR_KEYS, help="weights of a BasicSR file (default params_ema)")
    args = p.parse_args(argv)
    try:
        src = fetch_published() if args.src == SPEC else Path(args.src)
        out = import_weights(src, args.out, args.key)
    except DVMSRError as exc:
        return errors.fail(exc)
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    source, n = ckpt["source"], sum(v.numel() for v in ckpt["model"].values())
    print(
        f"wrote {out}: DVMSR x4 (preset 'dvmsr'), {n:,} parameters, from {source['file']} "
        f"({source['weights']}, sha256 {source['sha256'][:12]}...)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
