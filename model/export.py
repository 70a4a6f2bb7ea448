"""Export MambaLiteSR (or a convolutional reference of model/conv.py) to ONNX and check the file
before anyone uses it.

    python -m model.export --preset student --out student.onnx
    python -m model.export --checkpoint runs/student.pt --out student.onnx --json report.json

Steps: trace with the chunked scan (whatever scan the model was trained with) at a static input
shape (1x3x64x64 by default, the tile size of model/tiling.py), run ``onnx.checker``, refuse graphs
with Loop, Scan, If or CumSum nodes (TensorRT runs loops sequentially and has wrong-result bugs in
CumSum), compare ONNX Runtime with PyTorch on fresh random inputs in float32 and, as TensorRT builds
float16 engines, measure the error of a float16 graph (the model traced in half precision; the
scan upcasts itself to float32, as its exponent range needs). Nodes traced inside the scan are
named ``fp32_scan/...`` so a float16 TensorRT build can pin them to float32. The exporter's
metadata (source paths and lines of the machine that traced it) is removed: a model file says
nothing about where it was built. The file appears at ``--out`` only once every check has passed.

This is the only module of model/ that imports onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_agent import argtypes, errors
from edge_agent.contract import FP32_SCAN_PREFIX  # nodes a float16 engine must keep in float32
from edge_agent.errors import UserError
from edge_agent.fileio import atomic_path, sha256_file
from model.complexity import count_flops, count_params
from model.mambalitesr import PRESETS, MambaLiteSR, build_model, load_model
from model.runtime import keep_freed_memory

BANNED_OPS = frozenset({"Loop", "Scan", "If", "CumSum"})
SCAN_NAMESPACE = "model.scan.SelectiveScan"  # the exporter's module-scope metadata for them
DEFAULT_OPSET = 18
MIN_OPSET = 18  # torch.onnx's dynamo exporter cannot convert this graph to older opsets
FP32_TOLERANCE = 1e-4
# The float16 gate. A float16 engine is fine when its own error is far below the model's error:
# with the fp16-vs-fp32 PSNR at least FP16_MARGIN_DB above the model's PSNR, fp16 adds at most 1%
# to the model's MSE (0.04 dB). The model's PSNR comes from its validation (the search passes it);
# without one, DEFAULT_QUALITY_DB, about what x4 models reach on Set5, stands in.
FP16_MARGIN_DB = 20.0
DEFAULT_QUALITY_DB = 32.0

log = logging.getLogger(__name__)


class ExportError(UserError, RuntimeError):
    """The model could not be exported, or the exported file failed a check."""


@dataclass(frozen=True)
class ExportReport:
    path: str
    sha256: str
    input_shape: tuple[int, ...]
    opset: int
    params: int
    gflops: float  # analytic, model/complexity.py, at input_shape
    node_count: int
    op_census: dict[str, int]
    fp32_max_abs_err: float  # ONNX Runtime vs PyTorch, float32, over n_checks random inputs
    # float16 graph (scan in float32) in ONNX Runtime vs PyTorch float32; None: not checked
    fp16_max_abs_err: float | None
    fp16_psnr_db: float | None  # the same float16 outputs against PyTorch float32, as a PSNR (peak 1)
    fp16_ok: bool  # fp16_psnr_db >= quality_db + FP16_MARGIN_DB: else build fp32 engines only
    quality_db: float  # the model's PSNR the gate compared with
    n_checks: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def op_census(onnx_model) -> collections.Counter:
    """Count of each op type in the graph and in any local functions."""
    nodes = list(onnx_model.graph.node)
    for fn in onnx_model.functions:
        nodes.extend(fn.node)
    return collections.Counter(n.op_type for n in nodes)


def _mark_scan_nodes(onnx_model) -> int:
    """Prefix the names of nodes traced inside SelectiveScan; returns how many."""
    marked = 0
    for node in onnx_model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if SCAN_NAMESPACE in meta.get("namespace", "") and not node.name.startswith(FP32_SCAN_PREFIX):
            node.name = FP32_SCAN_PREFIX + node.name
            marked += 1
    return marked


def _strip_metadata(onnx_model) -> None:
    """Drop what the exporter records about the machine that traced the graph: every node's
    metadata (its source file paths and lines, module names) and doc strings. Called once the
    scan nodes are marked, the only use this module has for that metadata."""
    graphs = [onnx_model.graph, *onnx_model.functions]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        graph.doc_string = ""
        if hasattr(graph, "metadata_props"):
            del graph.metadata_props[:]
    for value in (*onnx_model.graph.input, *onnx_model.graph.output, *onnx_model.graph.value_info):
        if hasattr(value, "metadata_props"):
            del value.metadata_props[:]
        value.doc_string = ""
    onnx_model.doc_string = ""


def _trace(model: MambaLiteSR, dummy: torch.Tensor, opset: int):
    """torch.onnx (dynamo exporter) to an in-memory ModelProto, with the exporter's chatter muted."""
    import onnx

    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
            return onnx.load(str(path))


def _session(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _errors(session, inputs: list[np.ndarray], expected: list[np.ndarray]) -> tuple[float, float]:
    """(max abs error, PSNR in dB with peak 1) of the session's outputs against ``expected``."""
    name = session.get_inputs()[0].name
    dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    worst, sq, n = 0.0, 0.0, 0
    for x, ref in zip(inputs, expected):
        out = session.run(None, {name: x.astype(dtype)})[0].astype(np.float64)
        if not np.all(np.isfinite(out)):
            return float("inf"), float("-inf")
        worst = max(worst, float(np.abs(out - ref).max()))
        sq, n = sq + float(((out - ref) ** 2).sum()), n + out.size
    mse = sq / max(n, 1)
    return worst, (float("inf") if mse == 0 else float(-10 * np.log10(mse)))


def export_onnx(
    model: MambaLiteSR,
    out: str | os.PathLike,
    input_shape: tuple[int, int, int, int] = (1, 3, 64, 64),
    opset: int = DEFAULT_OPSET,
    n_checks: int = 3,
    tolerance: float = FP32_TOLERANCE,
    seed: int | None = None,
    quality_db: float | None = None,
    fp16: bool = True,
) -> ExportReport:
    """Export ``model`` to ``out`` and verify it (see the module docstring).

    ``quality_db`` is the model's PSNR (dB), for the float16 gate (``fp16_ok`` in the report);
    None takes DEFAULT_QUALITY_DB. ``fp16=False`` skips the float16 graph (a second trace) for a
    model only ever run in float32, such as on a CPU: the report marks it fp32-only.

    Raises:
        ExportError: tracing failed, the checker refused the graph, a banned op appeared, or ONNX
            Runtime disagreed with PyTorch by more than ``tolerance`` in float32. Nothing is
            written to ``out`` in that case.
    """
    import onnx

    if len(input_shape) != 4 or input_shape[1] != 3 or min(input_shape) <= 0:
        raise ExportError(f"input_shape must be (batch, 3, height, width) and positive, got {input_shape}")
    # The exported graph always uses the chunked scan: same weights, no CUDA kernel, no loop. A
    # convolutional reference (model/conv.py) has no scan: it is traced as it is.
    mamba = isinstance(model, MambaLiteSR)
    net = build_model(model.cfg.replace(scan="chunked") if mamba else model.cfg)
    net.load_state_dict(copy.deepcopy(model.state_dict()))
    net.eval()

    try:
        proto = _trace(net, torch.rand(input_shape), opset)
        proto16 = _trace(copy.deepcopy(net).half(), torch.rand(input_shape).half(), opset) if fp16 else None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx could not trace the model ({type(exc).__name__}: {first})") from exc

    banned = sorted(BANNED_OPS & set(op_census(proto)))
    if banned:
        raise ExportError(f"the exported graph contains {banned}, which TensorRT runs poorly or wrongly")
    if _mark_scan_nodes(proto) == 0 and mamba:
        raise ExportError(
            f"found no node from {SCAN_NAMESPACE} in the exported graph; the exporter's metadata "
            "changed, so the float16 precision marks cannot be placed"
        )
    _strip_metadata(proto)  # the one written out; the float16 graph is only run here
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc

    gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    inputs = [torch.rand(input_shape, generator=gen) for _ in range(n_checks)]
    with torch.no_grad():
        expected = [net(x).double().numpy() for x in inputs]
    feeds = [x.numpy() for x in inputs]

    fp32_err, _ = _errors(_session(proto.SerializeToString()), feeds, expected)
    if not fp32_err <= tolerance:
        raise ExportError(
            f"ONNX Runtime differs from PyTorch by {fp32_err:.3g} (tolerance {tolerance:g}) in float32"
        )
    fp16_err, fp16_psnr = None, None
    if proto16 is not None:
        fp16_err, fp16_psnr = _errors(_session(proto16.SerializeToString()), feeds, expected)
    quality = DEFAULT_QUALITY_DB if quality_db is None else float(quality_db)

    out = Path(out)
    try:
        with atomic_path(out) as partial:  # a reader never sees a half-written file at `out`
            onnx.save(proto, str(partial))
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}; choose a writable file path") from exc

    census = op_census(proto)
    _, _, h, w = input_shape
    return ExportReport(
        path=str(out),
        sha256=sha256_file(out),
        input_shape=tuple(input_shape),
        opset=opset,
        params=count_params(net),
        gflops=count_flops(net.cfg, h, w, batch=input_shape[0]).gflops,
        node_count=sum(census.values()),
        op_census=dict(census.most_common()),
        fp32_max_abs_err=fp32_err,
        fp16_max_abs_err=fp16_err,
        fp16_psnr_db=fp16_psnr,
        fp16_ok=fp16_psnr is not None and fp16_psnr >= quality + FP16_MARGIN_DB,
        quality_db=quality,
        n_checks=n_checks,
    )


def format_report(report: ExportReport) -> str:
    census = ", ".join(f"{op} {n}" for op, n in report.op_census.items())
    if report.fp16_psnr_db is None:
        fp16 = ["fp16       not checked (--no-fp16): build fp32 engines only"]
    else:
        fp16 = [
            f"fp16       max |ORT fp16 - PyTorch fp32| = {report.fp16_max_abs_err:.2e}, PSNR "
            f"{report.fp16_psnr_db:.1f} dB (scan in fp32; its nodes are named '{FP32_SCAN_PREFIX}*')",
            f"fp16 gate  {'ok' if report.fp16_ok else 'FAILED: build fp32 engines only'} (needs "
            f"{report.quality_db + FP16_MARGIN_DB:.1f} dB: the model's {report.quality_db:.2f} + "
            f"{FP16_MARGIN_DB:g})",
        ]
    return "\n".join(
        [
            f"exported   {report.path}",
            f"sha256     {report.sha256}",
            f"input      {'x'.join(map(str, report.input_shape))}, opset {report.opset}",
            f"model      {report.params:,} parameters, {report.gflops:.3f} GFLOPs per input",
            f"graph      {report.node_count} nodes: {census}",
            f"fp32       max |ORT - PyTorch| = {report.fp32_max_abs_err:.2e} "
            f"over {report.n_checks} random inputs",
            *fp16,
        ]
    )


def _opset(text: str) -> int:
    """argparse type: an opset the exporter produces (below 18 it silently writes 18) and the
    installed onnx knows."""
    import onnx

    opset, newest = argtypes.positive_int(text), onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise argparse.ArgumentTypeError(
            f"opset {opset} is outside what this torch and onnx export ({MIN_OPSET} to {newest})"
        )
    return opset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="export a freshly initialised preset")
    src.add_argument("--checkpoint", help="export a trained checkpoint (trainers' .pt file)")
    p.add_argument("--out", required=True, help="where to write the .onnx file")
    p.add_argument(
        "--height", type=argtypes.positive_int, default=64, help="static LR input height (default 64)"
    )
    p.add_argument(
        "--width", type=argtypes.positive_int, default=64, help="static LR input width (default 64)"
    )
    p.add_argument(
        "--opset", type=_opset, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    p.add_argument(
        "--n-checks", type=argtypes.positive_int, default=3, help="random inputs compared with PyTorch"
    )
    p.add_argument(
        "--tolerance", type=argtypes.positive_float, default=FP32_TOLERANCE, help="max fp32 abs error"
    )
    p.add_argument(
        "--seed", type=argtypes.nonnegative_int, default=None, help="seed for init and check inputs"
    )
    p.add_argument("--json", type=argtypes.writable_file, help="also write the report as JSON here")
    p.add_argument(
        "--quality-db",
        type=argtypes.positive_float,
        help=f"the model's PSNR, for the fp16 gate (default {DEFAULT_QUALITY_DB:g})",
    )
    p.add_argument(
        "--no-fp16",
        dest="fp16",
        action="store_false",
        help="skip the float16 graph (a second trace) for a model run only in float32, as on a CPU",
    )
    args = p.parse_args(argv)
    # checked before the minutes of tracing, not after; exit 1 and the words export_onnx uses when
    # the write itself fails (--json is checked by argparse, exit 2, as in every CLI)
    problem = argtypes.writable_problem(args.out)
    if problem:
        print(f"error: cannot write {args.out}: {problem}", file=sys.stderr)
        return 1
    if args.seed is not None:
        torch.manual_seed(args.seed)
    keep_freed_memory()
    try:
        model = load_model(args.checkpoint) if args.checkpoint else build_model(args.preset or "student")
        report = export_onnx(
            model,
            args.out,
            (1, 3, args.height, args.width),
            args.opset,
            args.n_checks,
            args.tolerance,
            args.seed,
            args.quality_db,
            args.fp16,
        )
    except (UserError, ValueError) as exc:
        return errors.fail(exc)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
