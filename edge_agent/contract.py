"""The MLflow contract between the search and the edge agent: names both sides read from here.

The search (search/) registers each Pareto candidate as a version of ``REGISTERED_MODEL``, its
source the trial run and its artifact a verified ONNX file, tagged as below. The agent claims
versions whose ``edge.<device>.status`` is ``pending``, measures them, and logs the figures onto the
trial run. This module imports nothing beyond the standard library: it must load on a Jetson.
"""

from __future__ import annotations

EXPERIMENT = "mambalitesr"
REGISTERED_MODEL = "mambalitesr-student"
CHAMPION_ALIAS = "champion"
ONNX_ARTIFACT_DIR = "onnx"  # artifact folder on the trial run holding model.onnx
ONNX_FILE = "model.onnx"

# run tags
ROLE = "role"
ROLE_STUDY, ROLE_TRIAL, ROLE_TEACHER = "study", "trial", "teacher"

# version tags
TAG_SHA256 = "onnx_sha256"
TAG_INPUT_SHAPE = "input_shape"  # e.g. "1x3x64x64"
TAG_TRIAL_RUN = "trial_run_id"

# edge.<device>.status values
PENDING, MEASURING, DONE, FAILED = "pending", "measuring", "done", "failed"
STATUSES = (PENDING, MEASURING, DONE, FAILED)

# metrics the agent logs on the trial run
EDGE_METRICS = (
    "edge_latency_ms_p50",
    "edge_latency_ms_p90",
    "edge_latency_ms_p99",
    "edge_power_mw",
    "edge_idle_power_mw",
    "edge_energy_mj_per_image",
)


def status_tag(device: str) -> str:
    """Version tag holding a device type's measurement status."""
    _check_device(device)
    return f"edge.{device}.status"


def error_tag(device: str) -> str:
    _check_device(device)
    return f"edge.{device}.error"


def _check_device(device: str) -> None:
    if not device or not all(c.isalnum() or c in "-_" for c in device):
        raise ValueError(f"device name {device!r} must be letters, digits, '-' or '_' (e.g. orin-nano)")
