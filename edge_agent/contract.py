"""The MLflow contract between the search and the edge agent: names both sides read from here.

The search (search/) registers each Pareto candidate as a version of ``REGISTERED_MODEL``, its
source the trial run and its artifact a verified ONNX file, tagged as below. The agent claims
versions whose ``edge.<device>.status`` is ``pending``, measures them, and logs the figures onto the
trial run (metrics, a few tags, one JSON artifact) and the version (tags). This module imports
nothing beyond the standard library: it must load on a Jetson.
"""

from __future__ import annotations

import os
import urllib.parse

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
# The export's float16 gate (model/export.py): "fp16" where a float16 engine keeps the model's
# quality, "fp32" where it does not; the agent then builds float32 whatever its --precision.
TAG_PRECISION = "onnx_precision"
FP16_OK, FP32_ONLY = "fp16", "fp32"
# Node-name prefix the export gives the scan's nodes (model/export.py): a float16 engine keeps
# them in float32 (edge_agent/backends.py).
FP32_SCAN_PREFIX = "fp32_scan/"

# edge.<device>.status values
PENDING, MEASURING, DONE, FAILED = "pending", "measuring", "done", "failed"
STATUSES = (PENDING, MEASURING, DONE, FAILED)

# Figures the agent logs, per device type, on the trial run (as metrics) and on the version (as
# tags): ``edge.<device>.<name>``. Without the device in the key (``edge_latency_ms_p50``), one
# run measured by two device types would have one value overwrite the other, so the device
# is part of the key, in the same form as the version's status tag.
LATENCY_P50, LATENCY_P90, LATENCY_P99 = "latency_ms_p50", "latency_ms_p90", "latency_ms_p99"
LATENCY_MEAN = "latency_ms_mean"
POWER = "power_mw"  # mean module input power (VDD_IN) over the loaded window
IDLE_POWER = "idle_power_mw"
ENERGY = "energy_mj_per_image"  # net of idle
THROUGHPUT = "throughput_ips"
# Each figure is the mean over the agent's loaded windows (edge_agent/measure.py); beside them, how
# much the compared ones varied across the windows (std / mean), and whether they varied more than
# the agent's limit twice: an unstable candidate (1.0) is reported and never ranked.
LATENCY_STD, LATENCY_CV, ENERGY_CV = "latency_ms_std", "latency_cv", "energy_cv"
UNSTABLE = "unstable"
EDGE_METRICS = (LATENCY_P50, LATENCY_P90, LATENCY_P99, POWER, IDLE_POWER, ENERGY, THROUGHPUT)
EDGE_METRICS += (LATENCY_MEAN, LATENCY_STD, LATENCY_CV, ENERGY_CV, UNSTABLE)
# The few tags the agent sets beside the figures, on the run and on the version (plus
# ``edge.<device>.error`` for a failure): what candidates are compared by. Where no power source
# was found, the power note says why, cut to POWER_NOTE_CHARS; everything else the agent records
# (its id, the report's id, device info, library versions, rails, the windows) goes into one JSON
# artifact on the run (``measurement_artifact``), not into tags that crowd MLflow's pages.
TAG_BACKEND, TAG_POWER_SOURCE, TAG_POWER_NOTE = "backend", "power_source", "power_note"
REPORT_TAGS = (TAG_BACKEND, TAG_POWER_SOURCE, TAG_POWER_NOTE)
POWER_NOTE_CHARS = 250
# Claim bookkeeping on the version while it is measured (the registry has no compare-and-set: see
# edge_agent/agent.py); removed once the status is done or failed, or the claim is handed back.
# ``stale_after_s`` is the claimer's own takeover time: every agent judges a claim by the period
# its claimer beats at, not by its own (agents of one type may be started with different ones).
TAG_CLAIMED_BY, TAG_HEARTBEAT, TAG_STALE_AFTER = "claimed_by", "heartbeat", "stale_after_s"
CLAIM_TAGS = (TAG_CLAIMED_BY, TAG_HEARTBEAT, TAG_STALE_AFTER)


def edge_key(device: str, name: str) -> str:
    """``edge.<device>.<name>``: the key of a per-device metric or tag."""
    _check_device(device)
    return f"edge.{device}.{name}"


def split_edge_key(key: str) -> tuple[str, str] | None:
    """``(device, name)`` of an ``edge.<device>.<name>`` key; None for any other key."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "edge":
        return None
    return parts[1], parts[2]


def status_tag(device: str) -> str:
    """Version tag holding a device type's measurement status."""
    return edge_key(device, "status")


# A version's description has one line per device type under this heading, which the registration
# writes (pending, with the command that measures it) and each agent rewrites for its device when it
# reports (done, with the figures; failed, with the reason), so the page never says pending after
# a measurement.
STATUS_HEADING = (
    "Edge status (each agent updates its device's line; the `edge.<device>.status` tags say the same):"
)


def status_line(device: str, status: str, metrics: dict, tags: dict, error: str = "") -> str:
    """The description's line for a finished measurement of ``device``."""
    if status != DONE:
        return f"- {device}: {status} — {(error or 'no error recorded').splitlines()[0][:300]}"
    m = metrics
    mean = m.get(LATENCY_MEAN, m.get(LATENCY_P50))
    text = f"- {device}: {DONE} — latency {mean:.4g} ms mean" if mean is not None else f"- {device}: {DONE}"
    if m.get(LATENCY_STD) is not None:
        text += f" (SD {m[LATENCY_STD]:.2g} ms across windows)"
    if m.get(LATENCY_P99) is not None:
        text += f", p99 {m[LATENCY_P99]:.4g} ms"
    if m.get(POWER) is not None:
        text += f"; power {m[POWER]:.0f} mW"
        if m.get(ENERGY) is not None:
            text += f", {m[ENERGY]:.4g} mJ/image"
    else:
        text += f"; no power figure (power source: {tags.get(TAG_POWER_SOURCE) or 'none'})"
    return text + (f" ({tags[TAG_BACKEND]})" if tags.get(TAG_BACKEND) else "")


def with_status_line(description: str, device: str, line: str) -> str:
    """``description`` with ``device``'s status line replaced by ``line`` (added under the heading,
    or at the end, when it has none)."""
    lines = (description or "").split("\n")
    prefix = f"- {device}: "
    for i, old in enumerate(lines):
        if old.startswith(prefix):
            lines[i] = line
            return "\n".join(lines)
    if STATUS_HEADING not in lines:
        lines += ["", STATUS_HEADING]
    at = lines.index(STATUS_HEADING) + 1
    while at < len(lines) and lines[at].startswith("- "):
        at += 1
    lines.insert(at, line)
    return "\n".join(lines).strip("\n")


def error_tag(device: str) -> str:
    return edge_key(device, "error")


def measurement_artifact(device: str) -> str:
    """Where on the trial run a device type's whole report lies, as JSON (edge_agent.outbox.Report)."""
    _check_device(device)
    return f"edge/{device}/measurement.json"


def _check_device(device: str) -> None:
    if not device or not all(c.isalnum() or c in "-_" for c in device):
        raise ValueError(f"device name {device!r} must be letters, digits, '-' or '_' (e.g. orin-nano)")


def uri_credential_problem(tracking_uri: str | None, name: str = "the tracking URI") -> str | None:
    """Why ``tracking_uri`` must not be used as given (it carries a password or token), or None;
    ``name`` says where the URI came from.

    A URI is printed, logged, stored as an MLflow param and pickled by Ray: credentials belong in
    MLflow's own variables, which nothing here records.
    """
    if not tracking_uri:
        return None
    parsed = urllib.parse.urlsplit(tracking_uri)
    query = parsed.query.lower()
    in_query = "token=" in query or "password=" in query
    if "@" not in parsed.netloc and not in_query:  # no user:password@ (or token@) part, no ?token=
        return None
    return (
        f"{name} carries a credential, which would end up in logs, MLflow params and Ray's "
        "files; give it without one (e.g. http://host:5000) and set MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN instead"
    )


def credential_problem(tracking_uri: str | None) -> str | None:
    """Why a command line must not run with ``tracking_uri`` (its --tracking-uri) or with the
    environment's MLFLOW_TRACKING_URI, or None. The environment's URI is checked even when a flag
    overrides it: the processes a command starts (Ray's workers, a local agent) inherit it."""
    return uri_credential_problem(tracking_uri) or uri_credential_problem(
        os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI (the environment)"
    )
