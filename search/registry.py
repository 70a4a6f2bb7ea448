"""Export Pareto candidates to verified ONNX files and register them for the edge agent."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent import contract
from model.export import export_onnx
from model.mambalitesr import load_model
from search import study

TAG_WEIGHTS_RUN = "weights_run_id"  # on a version whose weights are its trial's finalization


def version_of_trial(tracking_uri: str, model_name: str, trial_run_id: str):
    """The version registered for a trial (from its own weights or its finalization's), or None."""
    c = study.client(tracking_uri)
    for v in study.all_pages(c.search_model_versions, f"name='{model_name}'", max_results=200):
        if v.run_id == trial_run_id or v.tags.get(contract.TAG_TRIAL_RUN) == trial_run_id:
            return v
    return None


@dataclass(frozen=True)
class Registered:
    run_id: str
    version: str
    sha256: str
    fp32_max_abs_err: float
    node_count: int


def register_candidate(
    tracking_uri: str,
    run_id: str,
    model_name: str,
    devices: tuple[str, ...],
    input_size: int,
    weights_run_id: str | None = None,
) -> Registered:
    """Export a checkpoint, check it, log the ONNX beside it, register a version of the trial.

    The weights are the trial run's, or those of ``weights_run_id`` (its finalization: the same
    knobs retrained at full length); the version belongs to the run holding the weights, and its
    ``trial_run_id`` tag names the trial either way.
    A run already registered (a resumed study) is not registered twice: its version is returned.
    """
    c = study.client(tracking_uri)
    existing = version_of_trial(tracking_uri, model_name, run_id)
    if existing:
        v = existing
        return Registered(run_id, v.version, v.tags.get(contract.TAG_SHA256, ""), float("nan"), -1)
    weights = weights_run_id or run_id
    ckpt = study.single_file(study.download(f"runs:/{weights}/checkpoint", tracking_uri), ".pt")
    net = load_model(str(ckpt))
    quality = c.get_run(weights).data.metrics.get("val_psnr_y")  # the fp16 gate compares with it
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / contract.ONNX_FILE
        report = export_onnx(net, onnx_path, (1, 3, input_size, input_size), quality_db=quality)
        c.log_artifact(weights, str(onnx_path), contract.ONNX_ARTIFACT_DIR)
    c.log_metric(weights, "onnx_fp16_max_abs_err", report.fp16_max_abs_err)
    c.log_metric(weights, "onnx_fp16_psnr_db", report.fp16_psnr_db)
    c.log_metric(weights, "onnx_fp32_max_abs_err", report.fp32_max_abs_err)
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
    if weights_run_id:
        tags[TAG_WEIGHTS_RUN] = weights_run_id
    # MLflow ties a runs:/ source to its run: a finalized version is its finalization run's, which
    # then receives the agent's measurements; trial_run_id still names the trial
    version = c.create_model_version(
        model_name, source=f"runs:/{weights}/{contract.ONNX_ARTIFACT_DIR}", run_id=weights, tags=tags
    )
    return Registered(run_id, version.version, report.sha256, report.fp32_max_abs_err, report.node_count)
