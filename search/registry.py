"""Export Pareto candidates to verified ONNX files and register them for the edge agent."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent import contract
from model.export import export_onnx
from model.mambalitesr import load_model
from search import study


@dataclass(frozen=True)
class Registered:
    run_id: str
    version: str
    sha256: str
    fp32_max_abs_err: float
    node_count: int


def register_candidate(
    tracking_uri: str, run_id: str, model_name: str, devices: tuple[str, ...], input_size: int
) -> Registered:
    """Export the trial run's checkpoint, check it, log the ONNX on the run, register a version.

    A run already registered (a resumed study) is not registered twice: its version is returned.
    """
    c = study.client(tracking_uri)
    existing = c.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    if existing:
        v = existing[0]
        return Registered(run_id, v.version, v.tags.get(contract.TAG_SHA256, ""), float("nan"), -1)
    ckpt = study.single_file(study.download(f"runs:/{run_id}/checkpoint", tracking_uri), ".pt")
    net = load_model(str(ckpt))
    quality = c.get_run(run_id).data.metrics.get("val_psnr_y")  # the fp16 gate compares with it
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / contract.ONNX_FILE
        report = export_onnx(net, onnx_path, (1, 3, input_size, input_size), quality_db=quality)
        c.log_artifact(run_id, str(onnx_path), contract.ONNX_ARTIFACT_DIR)
    c.log_metric(run_id, "onnx_fp16_max_abs_err", report.fp16_max_abs_err)
    c.log_metric(run_id, "onnx_fp16_psnr_db", report.fp16_psnr_db)
    c.log_metric(run_id, "onnx_fp32_max_abs_err", report.fp32_max_abs_err)
    try:
        c.create_registered_model(model_name)
    except Exception as exc:  # RESOURCE_ALREADY_EXISTS
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    tags = {
        contract.TAG_SHA256: report.sha256,
        contract.TAG_INPUT_SHAPE: "x".join(map(str, report.input_shape)),
        contract.TAG_TRIAL_RUN: run_id,
        contract.TAG_PRECISION: contract.FP16_OK if report.fp16_ok else contract.FP32_ONLY,
        **{contract.status_tag(d): contract.PENDING for d in devices},
    }
    version = c.create_model_version(
        model_name, source=f"runs:/{run_id}/{contract.ONNX_ARTIFACT_DIR}", run_id=run_id, tags=tags
    )
    return Registered(run_id, version.version, report.sha256, report.fp32_max_abs_err, report.node_count)
