"""Engine backends: one ONNX file in, something that runs one inference at a time out.

Three backends behind one small interface (``Engine``):

- ``onnxruntime``: any machine; the development and CI backend, and the fallback on a device
  without TensorRT.
- ``tensorrt``: TensorRT's Python API (what JetPack ships). FP16 by default, with the selective
  scan's nodes (named ``fp32_scan/...`` by ``model/export.py``) pinned to FP32: the chunked scan
  multiplies exponentials whose range needs fp32 (an all-fp16 engine gave errors up to 2.2).
  Engines are cached by model sha256, TensorRT version and precision, with a timing cache. All
  TensorRT calls that differ between 8.6 and 10.x go through ``_TrtApi``.
- ``trtexec``: TensorRT's command-line tool, for devices where the Python bindings are missing.
  It times its own loop, so it is not an ``Engine``: ``run_trtexec`` returns its parsed summary
  and the measurement protocol uses throughput instead of per-inference times.

tensorrt, cuda runtime and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.contract import FP32_SCAN_PREFIX
from edge_agent.errors import UserError
from edge_agent.fileio import atomic_write_bytes
from edge_agent.parsers import TrtexecSummary, parse_trtexec

log = logging.getLogger("edge_agent.backends")

BACKENDS = ("auto", "onnxruntime", "tensorrt", "trtexec")
PRECISIONS = ("fp16", "fp32")


class BackendError(UserError, RuntimeError):
    """An engine could not be built or run; the message says why and what to do."""


class Engine(Protocol):
    backend: str
    input_shape: tuple[int, ...]

    def infer(self) -> None:
        """Run one inference on the bound input and wait until its output is ready."""

    def versions(self) -> dict[str, str]:
        """Software versions that produced this engine (for the result's tags)."""

    def close(self) -> None: ...


def resolve_backend(name: str) -> str:
    """``auto`` -> tensorrt if its Python API imports, else trtexec if on PATH, else onnxruntime."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    try:
        import tensorrt  # noqa: F401

        return "tensorrt"
    except ImportError:
        pass
    if trtexec_path():
        return "trtexec"
    return "onnxruntime"


# ----------------------------------------------------------------------------- ONNX Runtime


SR_INPUT = "one float image input of shape (1, 3, H, W)"  # what every backend and evaluate expect
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .*? failed: ?)?")


@functools.cache
def _ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception types (InvalidProtobuf, InvalidGraph, NoSuchFile, Fail, ...).

    They derive from Exception directly, not from one base of their own, so they are collected
    from the module that defines them; a version that adds one is covered without a change here.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return found or (RuntimeError,)


def _ort_reason(exc: Exception) -> str:
    """ORT's message without its ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from`` frame."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return _ORT_PREFIX.sub("", first).strip().rstrip(".") or type(exc).__name__


def _signature_problem(inputs: Sequence[Any]) -> str | None:
    """Why a graph's inputs are not one static float (1, 3, H, W) image (None if they are)."""
    if len(inputs) != 1:
        return f"has {len(inputs)} inputs ({', '.join(i.name for i in inputs)})"
    (inp,) = inputs
    shape = tuple(inp.shape)
    if inp.type not in ("tensor(float)", "tensor(float16)"):
        return f"takes {inp.type} {list(shape)}, not a float image"
    if len(shape) != 4:
        return f"takes a {len(shape)}-D input {list(shape)}"
    if not all(isinstance(d, int) and d > 0 for d in shape):
        return f"has a dynamic input shape {list(shape)} (export with a static shape)"
    if shape[:2] != (1, 3):
        return f"takes input {list(shape)}: batch {shape[0]} and {shape[1]} channels"
    return None


class OrtModel:
    """An ONNX file opened in ONNX Runtime, checked to take one static (1, 3, H, W) float image.

    The one place that opens a model file for ONNX Runtime (the agent's engine, trainers.evaluate):
    a file ORT cannot load or run, or one with another input signature, is a ``BackendError`` that
    names the file and says what to do.
    """

    def __init__(self, path: Path, providers: Sequence[str] | None = None, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime") from exc
        self.path = Path(path)
        self.version = ort.__version__
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0 = ORT's default (one per physical core)
        opts.log_severity_level = 3  # errors come back as exceptions; ORT's own log would repeat them
        # CUDA when there is one, else the CPU. Not ORT's TensorRT EP: the tensorrt backend owns that,
        # and a result must say which engine it measured
        chosen = (
            list(providers)
            if providers
            else [
                p
                for p in ort.get_available_providers()
                if p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            ]
        )
        try:
            self._session = ort.InferenceSession(str(self.path), opts, providers=chosen)
        except _ort_errors() as exc:
            raise BackendError(
                f"ONNX Runtime could not load {self.path} ({_ort_reason(exc)}): check that it is a complete "
                "ONNX file, or export it again with python -m model.export"
            ) from exc
        problem = _signature_problem(self._session.get_inputs())
        if problem:
            raise BackendError(
                f"{self.path} {problem}; a super-resolution model takes {SR_INPUT}: export one with "
                "python -m model.export"
            )
        inp = self._session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape: tuple[int, ...] = tuple(inp.shape)
        self.input_dtype = np.dtype(np.float16 if inp.type == "tensor(float16)" else np.float32)
        self.output_shape = tuple(self._session.get_outputs()[0].shape)
        self.providers = self._session.get_providers()

    def run(self, x: np.ndarray) -> np.ndarray:
        """The first output for input ``x`` (cast to the graph's input dtype)."""
        try:
            return self._session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0]
        except _ort_errors() as exc:
            raise BackendError(
                f"ONNX Runtime failed running {self.path} ({_ort_reason(exc)}); export the model again "
                "with python -m model.export"
            ) from exc

    def close(self) -> None:
        self._session = None


class OrtEngine:
    """ONNX Runtime session with a fixed random input (SR latency does not depend on pixel values)."""

    backend = "onnxruntime"

    def __init__(self, model: Path, providers: Sequence[str] | None = None, threads: int = 0, seed: int = 0):
        self._model = OrtModel(model, providers, threads)
        self.input_shape = self._model.input_shape
        self.providers = self._model.providers
        self._input = np.random.default_rng(seed).random(self.input_shape, dtype=np.float32)
        self._input = self._input.astype(self._model.input_dtype)

    def infer(self) -> None:
        self._model.run(self._input)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime_version": self._model.version, "ort_providers": ",".join(self.providers)}

    def close(self) -> None:
        self._model.close()


# ----------------------------------------------------------------------------- TensorRT


@dataclass(frozen=True)
class EngineKey:
    """What an engine file depends on: the model bytes, the TensorRT build and the precision."""

    model_sha256: str
    trt_version: str
    precision: str

    def filename(self) -> str:
        return f"{self.model_sha256[:16]}-trt{self.trt_version}-{self.precision}.engine"


class _TrtApi:
    """The one place that knows how TensorRT 8.6 and 10.x differ.

    - 8.x networks need the EXPLICIT_BATCH creation flag; 10.x networks are always explicit
      batch and the flag is deprecated (0 is correct there).
    - 10.x removed ``build_engine`` and ``max_workspace_size``; ``build_serialized_network`` and
      ``set_memory_pool_limit`` exist in both, so only those are used.
    - Name-based I/O (``num_io_tensors``, ``set_tensor_address``, ``execute_async_v3``) exists from
      8.5 on and is the only form in 10.x, so it is used for both.
    """

    def __init__(self, trt: Any):
        self.trt = trt
        self.version = str(trt.__version__)
        self.major = int(self.version.split(".")[0])
        if (self.major, int(self.version.split(".")[1])) < (8, 6):
            raise BackendError(f"TensorRT {self.version} is too old; this agent supports 8.6 and 10.x")

    def network_flags(self) -> int:
        if self.major >= 10:
            return 0
        return 1 << int(self.trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)

    def pin_fp32(self, network: Any, prefix: str = FP32_SCAN_PREFIX) -> int:
        """Force layers whose names start with ``prefix`` (and their outputs) to fp32.

        Returns how many layers were pinned. TensorRT's ONNX parser names each layer after its
        ONNX node, so the export's ``fp32_scan/`` scope survives into the network.
        """
        pinned = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if not layer.name.startswith(prefix):
                continue
            layer.precision = self.trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (self.trt.float32, self.trt.float16):
                    layer.set_output_type(j, self.trt.float32)
            pinned += 1
        return pinned

    def configure(self, config: Any, precision: str, workspace_bytes: int) -> None:
        trt = self.trt
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            # without this flag TensorRT may ignore the per-layer fp32 request when fp16 is faster
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    def io_tensors(self, engine: Any) -> list[tuple[str, bool, tuple[int, ...], Any]]:
        """(name, is_input, shape, numpy dtype) for each I/O tensor of an engine."""
        trt = self.trt
        out = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            out.append((name, is_input, shape, dtype))
        return out


def build_trt_engine(
    trt: Any,
    model: Path,
    precision: str,
    timing_cache: Path,
    workspace_bytes: int = 1 << 30,
) -> bytes:
    """Parse the ONNX file and build a serialized engine (minutes on a Jetson for a big graph)."""
    api = _TrtApi(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(api.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {model.name}: {errors}")
    config = builder.create_builder_config()
    api.configure(config, precision, workspace_bytes)
    if precision == "fp16":
        pinned = api.pin_fp32(network)
        log.info("pinned scan layers to fp32", extra={"fields": {"layers": pinned}})
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine for {model.name}; see the log above")
    _save_cache(timing_cache, bytes(cache.serialize()))
    return bytes(serialized)


def _save_cache(path: Path, data: bytes) -> None:
    """Keep an engine or timing cache for next time; a full disk or a read-only folder costs a
    rebuild later, not this measurement, so it is a warning."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        log.warning(
            "could not write the cache file %s (%s); it will be built again next time: free disk space "
            "or pass a writable --state-dir",
            path,
            exc.strerror or exc,
        )


class _CudaRuntime:
    """The five CUDA runtime calls the TensorRT engine needs, through ctypes on libcudart.

    Using ctypes keeps cuda-python / pycuda off the device's dependency list: libcudart ships with
    JetPack. Every call is checked; an error names the call.
    """

    H2D = 1

    def __init__(self) -> None:
        lib = None
        for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise BackendError("libcudart (the CUDA runtime) was not found; is CUDA installed (JetPack)?")
        self.lib = lib

    def _check(self, rc: int, call: str) -> None:
        if rc != 0:
            raise BackendError(f"CUDA {call} failed with error {rc}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def copy_to_device(self, ptr: int, array: np.ndarray) -> None:
        src = array.ctypes.data_as(ctypes.c_void_p)
        rc = self.lib.cudaMemcpy(ctypes.c_void_p(ptr), src, ctypes.c_size_t(array.nbytes), self.H2D)
        self._check(rc, "cudaMemcpy")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def synchronize(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


class TrtEngine:
    """A deserialized TensorRT engine with device buffers bound; ``infer`` = enqueue + sync."""

    backend = "tensorrt"

    def __init__(self, model: Path, model_sha256: str, precision: str, cache_dir: Path):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendError(
                "TensorRT's Python API is not importable: on a Jetson install JetPack's python3-libnvinfer "
                "(and create the agent's venv with --system-site-packages), or use --backend trtexec"
            ) from exc
        self._api = _TrtApi(trt)
        self.precision = precision
        key = EngineKey(model_sha256, self._api.version, precision)
        path = cache_dir / key.filename()
        if path.is_file():
            log.info("reusing cached engine", extra={"fields": {"engine": str(path)}})
            plan = path.read_bytes()
        else:
            plan = build_trt_engine(trt, model, precision, cache_dir / f"timing-trt{self._api.version}.cache")
            _save_cache(path, plan)
        self.engine_path = path
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BackendError(f"cached engine {path} could not be loaded; delete it to rebuild")
        self._context = self._engine.create_execution_context()
        self._cuda = _CudaRuntime()
        self._buffers: list[int] = []
        rng = np.random.default_rng(0)
        for name, is_input, shape, dtype in self._api.io_tensors(self._engine):
            nbytes = int(np.prod(shape)) * dtype.itemsize
            ptr = self._cuda.malloc(nbytes)
            self._buffers.append(ptr)
            self._context.set_tensor_address(name, ptr)
            if is_input:
                self.input_shape = shape
                self._cuda.copy_to_device(ptr, rng.random(shape, dtype=np.float32).astype(dtype))
        self._stream = self._cuda.stream()

    def infer(self) -> None:
        if not self._context.execute_async_v3(self._stream):
            raise BackendError("TensorRT execute_async_v3 returned False")
        self._cuda.synchronize(self._stream)

    def versions(self) -> dict[str, str]:
        return {"tensorrt_version": self._api.version, "trt_precision": self.precision}

    def close(self) -> None:
        for ptr in self._buffers:
            self._cuda.free(ptr)
        self._buffers = []


# ----------------------------------------------------------------------------- trtexec


def trtexec_path() -> str | None:
    """trtexec is not on PATH on JetPack by default; it lives in /usr/src/tensorrt/bin."""
    return shutil.which("trtexec") or next(
        (p for p in ("/usr/src/tensorrt/bin/trtexec",) if os.access(p, os.X_OK)), None
    )


def fp32_layer_names(model: Path) -> list[str]:
    """Names of the ONNX nodes in the ``fp32_scan/`` scope (needs the ``onnx`` package)."""
    try:
        import onnx
    except ImportError as exc:
        raise BackendError(
            "the trtexec backend needs the onnx package to pin the scan to fp32: pip install onnx "
            "(or use --precision fp32)"
        ) from exc
    graph = onnx.load(str(model), load_external_data=False).graph
    return [n.name for n in graph.node if n.name.startswith(FP32_SCAN_PREFIX)]


def trtexec_command(
    exe: str,
    model: Path,
    engine: Path,
    precision: str,
    duration_s: float,
    warmup_s: float,
    fp32_layers: list[str],
) -> list[str]:
    """The trtexec command line: builds (or loads) the engine and times it for ``duration_s``."""
    cmd = [exe]
    if engine.is_file():
        cmd.append(f"--loadEngine={engine}")
    else:
        cmd += [
            f"--onnx={model}",
            f"--saveEngine={engine}",
            f"--timingCacheFile={engine.parent / 'timing.cache'}",
        ]
        if precision == "fp16":
            cmd.append("--fp16")
            if fp32_layers:
                cmd += [
                    "--precisionConstraints=obey",
                    "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers),
                ]
    cmd += [f"--warmUp={int(warmup_s * 1000)}", f"--duration={max(1, round(duration_s))}", "--useSpinWait"]
    return cmd


@dataclass(frozen=True)
class TrtexecRun:
    summary: TrtexecSummary
    trt_version: str
    started_s: float  # time.monotonic() around the process
    ended_s: float


def trtexec_version(banner: str) -> str:
    """``&&&& RUNNING TensorRT.trtexec [TensorRT v100300]`` -> ``10.3.0`` (8.x: v8601 -> 8.6.1).

    TensorRT 8 encodes its version as MAJOR*1000 + MINOR*100 + PATCH, 10.x as MAJOR*10000 + ...
    """
    m = re.search(r"TensorRT v(\d+)", banner)
    if not m:
        return "unknown"
    n = int(m.group(1))
    major, rest = (n // 10000, n % 10000) if n >= 100000 else (n // 1000, n % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def run_trtexec(
    model: Path,
    model_sha256: str,
    precision: str,
    cache_dir: Path,
    duration_s: float,
    warmup_s: float,
    exe: str | None = None,
    runner: Callable[[list[str]], subprocess.CompletedProcess] | None = None,
) -> TrtexecRun:
    """Run trtexec once over the timed window and parse its summary by field name."""
    exe = exe or trtexec_path()
    if not exe:
        raise BackendError("trtexec was not found on PATH or in /usr/src/tensorrt/bin")
    run = runner or (lambda c: subprocess.run(c, capture_output=True, text=True, check=False))
    version = trtexec_version(run([exe, "--help"]).stdout)
    engine = cache_dir / EngineKey(model_sha256, version, precision).filename()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)  # trtexec saves its engine there
    except OSError as exc:
        raise BackendError(
            f"cannot create the engine cache folder {cache_dir} ({exc.strerror or exc}); free disk space "
            "or pass a writable --state-dir"
        ) from exc
    layers = fp32_layer_names(model) if precision == "fp16" and not engine.is_file() else []
    cmd = trtexec_command(exe, model, engine, precision, duration_s, warmup_s, layers)
    started = time.monotonic()
    proc = run(cmd)
    ended = time.monotonic()
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise BackendError(f"trtexec exited with {proc.returncode}:\n{tail}")
    return TrtexecRun(parse_trtexec(proc.stdout), version, started, ended)


def open_engine(backend: str, model: Path, model_sha256: str, precision: str, cache_dir: Path) -> Engine:
    """Build or load an ``Engine`` for ``backend`` (not trtexec, which runs its own loop)."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose fp16 or fp32")
    if backend == "onnxruntime":
        return OrtEngine(model)
    if backend == "tensorrt":
        return TrtEngine(model, model_sha256, precision, cache_dir)
    raise BackendError(f"backend {backend!r} has no per-inference engine")
