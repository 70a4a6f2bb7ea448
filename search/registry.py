"""Export Pareto candidates to verified ONNX files and register them for the edge agent."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_agent import contract
from edge_agent.fileio import sha256_file
from model.export import export_onnx
from model.mambalitesr import load_model
from search import mlflow_util, study


def version_of_trial(tracking_uri: str, model_name: str, trial_run_id: str):
    """The version registered for a trial (from its own weights or its finalization's), or None."""
    c = mlflow_util.client(tracking_uri)
    for v in mlflow_util.all_pages(c.search_model_versions, f"name='{model_name}'", max_results=200):
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
    description: str = ""  # the version's, in markdown (see describe_version)


def onnx_signature(onnx_model):
    """MLflow signature of an ONNX graph: its named inputs and outputs with their dtypes and shapes.

    The export's shapes are static (e.g. float32 (1, 3, 64, 64) -> (1, 3, 256, 256)); a symbolic
    dimension, should one appear, becomes -1 (any size).
    """
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def specs(values) -> Schema:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(TensorSpec(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), shape, v.name))
        return Schema(out)

    initializers = {i.name for i in onnx_model.graph.initializer}  # old exporters list weights as inputs
    inputs = [v for v in onnx_model.graph.input if v.name not in initializers]
    return ModelSignature(inputs=specs(inputs), outputs=specs(onnx_model.graph.output))


def save_onnx_model(onnx_file: Path, out_dir: Path):
    """An MLflow model folder (ONNX flavor, with the graph's signature) at ``out_dir``, holding
    ``onnx_file`` byte for byte as its ``model.onnx``. Returns the signature.

    Why a saved folder uploaded with ``log_artifacts`` rather than ``mlflow.onnx.log_model``: in
    MLflow 3 log_model creates a LoggedModel through the fluent API (the global tracking URI and
    active run) and stores the files under the LoggedModel's own artifact location, not in the
    trial run's ``onnx/`` folder that the version's ``runs:/<run>/onnx`` source and the edge agent
    read. The search talks to MLflow through a client with an explicit tracking URI and must not
    start, end or change the status of a trial run it does not own; a saved model uploaded into
    the run needs neither, and the run's artifact view still shows the MLmodel with its schema.
    """
    import shutil

    import mlflow.onnx
    import onnx

    proto = onnx.load(str(onnx_file))
    signature = onnx_signature(proto)
    mlflow.onnx.save_model(
        proto,
        str(out_dir),
        signature=signature,
        save_as_external_data=False,  # one self-contained model.onnx, as the agent and TensorRT want
        # given, so that MLflow does not infer them by loading the model in a subprocess
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
    )
    # save_model re-serializes the proto; the file uploaded must be the one export_onnx verified
    # and whose sha256 the version's tag carries
    shutil.copyfile(onnx_file, out_dir / contract.ONNX_FILE)
    return signature


def describe_version(
    *,
    trial_run_id: str,
    weights_run_id: str,
    label: str | None,
    quality_db: float | None,
    source: str,
    input_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    devices: tuple[str, ...],
    model_name: str,
    tracking_uri: str,
) -> str:
    """The version's description (markdown): the trial, its quality, the ONNX, who measures it."""
    trial = f"`{label}` (run `{trial_run_id}`)" if label else f"run `{trial_run_id}`"
    if weights_run_id != trial_run_id:
        trial += f", weights retrained in run `{weights_run_id}`"
    psnr = f"{quality_db:.2f} dB" if quality_db is not None else "not logged"
    shapes = f"{'x'.join(map(str, input_shape))} -> {'x'.join(map(str, output_shape))}"
    lines = [
        f"Trial {trial}.",
        "",
        f"- validation PSNR-Y: {psnr}",
        f"- ONNX: `{source}` (MLflow ONNX model, float32 input {shapes})",
    ]
    if devices:
        # a credential in the URI would be published here: a placeholder instead
        uri = "URI" if contract.uri_credential_problem(tracking_uri) else tracking_uri
        name = "" if model_name == contract.REGISTERED_MODEL else f" --model-name {model_name}"
        lines += ["", contract.STATUS_HEADING]
        lines += [
            f"- {d}: {contract.PENDING} — waiting for an edge agent of this device type "
            f"(`edge-agent run --device {d} --tracking-uri {uri}{name}`)"
            for d in devices
        ]
    return "\n".join(lines)


def register_candidate(
    tracking_uri: str,
    run_id: str,
    model_name: str,
    devices: tuple[str, ...],
    input_size: int,
    weights_run_id: str | None = None,
    label: str | None = None,
    fp16: bool = True,
) -> Registered:
    """Export a checkpoint, check it, log it beside the weights as an MLflow ONNX model (with its
    input signature), register a version of the trial with a description.

    The weights are the trial run's, or those of ``weights_run_id`` (its finalization: the same
    knobs retrained at full length); the version belongs to the run holding the weights, and its
    ``trial_run_id`` tag names the trial either way. ``label`` (e.g. ``t03 C32 r4 a0.60``) names
    the trial in the description. ``fp16=False`` skips the float16 check: the version is marked
    fp32-only.
    A run already registered (a resumed study) is not registered twice: its version is returned.
    """
    c = mlflow_util.client(tracking_uri)
    existing = version_of_trial(tracking_uri, model_name, run_id)
    if existing:
        v = existing
        return Registered(
            run_id, v.version, v.tags.get(contract.TAG_SHA256, ""), float("nan"), -1, v.description or ""
        )
    weights = weights_run_id or run_id
    ckpt = mlflow_util.single_file(
        mlflow_util.download(f"runs:/{weights}/{study.CHECKPOINT_DIR}", tracking_uri), ".pt"
    )
    net = load_model(str(ckpt))
    quality = c.get_run(weights).data.metrics.get(study.QUALITY)  # the fp16 gate compares with it
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / contract.ONNX_FILE
        report = export_onnx(net, onnx_path, (1, 3, input_size, input_size), quality_db=quality, fp16=fp16)
        model_dir = Path(tmp) / contract.ONNX_ARTIFACT_DIR
        signature = save_onnx_model(onnx_path, model_dir)
        assert sha256_file(model_dir / contract.ONNX_FILE) == report.sha256  # the verified file
        c.log_artifacts(weights, str(model_dir), contract.ONNX_ARTIFACT_DIR)
    if report.fp16_psnr_db is not None:
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
        tags[study.TAG_WEIGHTS_RUN] = weights_run_id
    # MLflow ties a runs:/ source to its run: a finalized version is its finalization run's, which
    # then receives the agent's measurements; trial_run_id still names the trial
    source = f"runs:/{weights}/{contract.ONNX_ARTIFACT_DIR}"
    description = describe_version(
        trial_run_id=run_id,
        weights_run_id=weights,
        label=label,
        quality_db=quality,
        source=source,
        input_shape=report.input_shape,
        output_shape=tuple(signature.outputs.inputs[0].shape),
        devices=devices,
        model_name=model_name,
        tracking_uri=tracking_uri,
    )
    version = c.create_model_version(
        model_name, source=source, run_id=weights, tags=tags, description=description
    )
    return Registered(
        run_id, version.version, report.sha256, report.fp32_max_abs_err, report.node_count, description
    )
