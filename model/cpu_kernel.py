"""Build, cache and load the fused CPU kernels (model/csrc/selective_scan_cpu.cpp): the selective
scan and the causal depthwise conv1d + SiLU in front of it.

    python -m model.cpu_kernel        # build now (or find the cached build) and print where it is

The kernel is plain C++ behind a C ABI, compiled with the system compiler at first use and loaded
with ctypes: no torch headers, no build dependency to install, and ctypes releases the GIL for the
call. The build is tuned to this CPU (``-march=native``), so the cached file is keyed by a hash of
the source, the compiler (path and version), the flags, and this CPU's feature flags: a cache on a
home directory shared between an AVX-512 and an AVX2 machine holds one build for each and never
hands one to the other.

Environment:
    MAMBALITESR_CXX        the C++ compiler to use (default: $CXX, else g++, c++, clang++ on PATH)
    MAMBALITESR_CACHE_DIR  where builds are kept (default: $XDG_CACHE_HOME/mambalitesr or
                           ~/.cache/mambalitesr), under kernels/

No compiler, or a failed build: one warning naming what is missing and how to get it, and
``kernel()`` returns None so that callers run the chunked scan instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import UserError
from edge_agent.fileio import atomic_path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"
ABI_VERSION = 2  # ss_abi_version() of a build this module can call
# -fno-trapping-math: the kernels never read floating-point exception flags, and without it gcc
# keeps the clamp in fast_exp as a branch on CPUs without AVX-512 masks (AVX2), which leaves every
# lane loop that calls it scalar: the scan ran 2-6x slower there
FLAGS = ("-O3", "-std=c++20", "-fopenmp-simd", "-fno-trapping-math", "-fPIC", "-shared", "-pthread")
# Tuned to this CPU; dropped (and the key changes with them) if the compiler refuses them. On x86,
# 512-bit vectors where the CPU has them: gcc prefers 256 bits by default, and this kernel's W = 16
# float32 lanes are one AVX-512 register.
NATIVE_FLAGS = ("-march=native",) + (
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()
)
# Threads from PyTorch's OpenMP pool (see parallel_items in the source); dropped where the compiler
# has no OpenMP (Apple clang without libomp), and the kernel then starts its own threads.
OPENMP_FLAGS = ("-fopenmp",)
COMPILERS = ("g++", "c++", "clang++")
INSTALL_HINT = (
    "install a C++20 compiler (Debian/Ubuntu: `apt-get install g++`; macOS: `xcode-select --install`) "
    "or point MAMBALITESR_CXX at one"
)


class KernelBuildError(UserError, RuntimeError):
    """The kernel could not be compiled or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Build:
    path: Path
    seconds: float  # compile time; 0.0 when the cached file was used
    cached: bool


def find_compiler() -> str:
    """The compiler's path: MAMBALITESR_CXX, $CXX, or the first of COMPILERS on PATH."""
    requested = os.environ.get("MAMBALITESR_CXX") or os.environ.get("CXX")
    candidates = [requested] if requested else list(COMPILERS)
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    tried = f"{requested!r} from MAMBALITESR_CXX/CXX is not there" if requested else ", ".join(COMPILERS)
    raise KernelBuildError(f"no C++ compiler found ({tried}); {INSTALL_HINT}")


def cpu_features() -> str:
    """This CPU's architecture and instruction-set flags, as one string (for the cache key)."""
    machine = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):  # x86 / arm
                    return machine + ":" + " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    if sys.platform == "darwin":
        for name in ("machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.brand_string"):
            try:
                out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
                machine += ":" + out.stdout.strip()
            except (OSError, subprocess.SubprocessError):
                pass
        return machine
    return machine + ":" + platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("MAMBALITESR_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "mambalitesr" / "kernels"


def _compiler_identity(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"cannot run the compiler {cxx} ({exc}); {INSTALL_HINT}") from exc
    first = (out.stdout or out.stderr).strip().splitlines()
    return f"{os.path.realpath(cxx)} {first[0] if first else ''}"


def build_key(cxx: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        _compiler_identity(cxx).encode(),
        " ".join(flags).encode(),
        cpu_features().encode(),
        str(ABI_VERSION).encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _compile(cxx: str, flags: tuple[str, ...], out: Path) -> None:
    cmd = [cxx, *flags, str(SOURCE), "-o", str(out)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"cannot run {cxx} ({exc}); {INSTALL_HINT}") from exc
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()] or res.stderr.splitlines()
        first = lines[0].strip() if lines else f"exit code {res.returncode}"
        raise KernelBuildError(f"{cxx} failed to build {SOURCE.name}: {first}")


def build(cxx: str | None = None, directory: Path | None = None) -> Build:
    """Compile the kernel for this CPU into the cache, unless a build for it is there already.

    The file appears under its final name only once complete (compiled beside it, then renamed);
    concurrent processes (Ray workers starting together) wait on a lock instead of compiling twice.

    Raises:
        KernelBuildError: no compiler, or the build failed (the message names the first error).
    """
    cxx = cxx or find_compiler()
    if not shutil.which(cxx):
        raise KernelBuildError(f"the C++ compiler {cxx!r} was not found; {INSTALL_HINT}")
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    attempts = [FLAGS + NATIVE_FLAGS + OPENMP_FLAGS, FLAGS + OPENMP_FLAGS, FLAGS]
    keys = [build_key(cxx, flags) for flags in attempts]
    for key in keys:  # a build cached by an earlier process, even a fallback one: no compiling again
        path = directory / f"selective_scan_cpu-{key}.so"
        if path.exists():
            return Build(path, 0.0, True)
    error: KernelBuildError | None = None
    for flags, key in zip(attempts, keys):
        path = directory / f"selective_scan_cpu-{key}.so"
        with _locked(directory / f"selective_scan_cpu-{key}.lock"):
            if path.exists():
                return Build(path, 0.0, True)
            start = time.perf_counter()
            try:
                with atomic_path(path) as tmp:
                    _compile(cxx, flags, tmp)
                return Build(path, time.perf_counter() - start, False)
            except KernelBuildError as exc:
                error = error or exc
    assert error is not None
    raise error


class _locked:
    """An exclusive advisory lock on a file (a no-op where fcntl does not exist)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock


def load(path: Path) -> ctypes.CDLL:
    """Open a built kernel and declare its functions' C types."""
    try:
        lib = ctypes.CDLL(str(path))
        version = lib.ss_abi_version()
    except (OSError, AttributeError) as exc:
        raise KernelBuildError(f"cannot load the kernel {path} ({exc}); delete it to rebuild") from exc
    if version != ABI_VERSION:
        raise KernelBuildError(f"{path} has ABI version {version}, not {ABI_VERSION}; delete it to rebuild")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"ss_forward_{suffix}")
        fwd.argtypes = [p] * 9 + [i64] * 5 + [i32]
        fwd.restype = i32
        bwd = getattr(lib, f"ss_backward_{suffix}")
        bwd.argtypes = [p] * 16 + [i64] * 5 + [i32]
        bwd.restype = i32
        scratch = getattr(lib, f"ss_backward_scratch_{suffix}")
        scratch.argtypes = [i64] * 4
        scratch.restype = i64
        conv_fwd = getattr(lib, f"conv_silu_forward_{suffix}")
        conv_fwd.argtypes = [p] * 4 + [i64] * 5 + [i32]
        conv_fwd.restype = i32
        conv_bwd = getattr(lib, f"conv_silu_backward_{suffix}")
        conv_bwd.argtypes = [p] * 8 + [i64] * 5 + [i32]
        conv_bwd.restype = i32
    return lib


def call(name: str, *args) -> None:
    """Call kernel function ``name`` (without its _f32/_f64 suffix, chosen by the first argument's
    dtype) with tensors passed as pointers (None as NULL), then the other arguments, then PyTorch's
    thread count. The kernel must be loaded (``kernel()`` is not None).

    Raises:
        RuntimeError: the kernel refused the sizes it was given (an internal error).
    """
    import torch

    suffix = "f64" if args[0].dtype == torch.float64 else "f32"
    values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    if getattr(kernel(), f"{name}_{suffix}")(*values, torch.get_num_threads()) != 0:
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        raise RuntimeError(f"the fused CPU kernel {name} refused tensors of shapes {shapes}")


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded kernel, built at the first call of the process; None (after one warning) if it
    cannot be built here. The result is kept for the life of the process."""
    try:
        result = build()
        if not result.cached:
            print(
                f"built the fused CPU scan kernel in {result.seconds:.1f} s (once per machine; cached at "
                f"{result.path})",
                file=sys.stderr,
            )
        return load(result.path)
    except KernelBuildError as exc:
        log.warning("fused CPU scan unavailable, using the chunked scan instead: %s", exc)
        return None


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = build()
        load(result.path)
    except KernelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = "found in the cache" if result.cached else f"built in {result.seconds:.1f} s"
    print(f"fused CPU scan kernel {state}: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
