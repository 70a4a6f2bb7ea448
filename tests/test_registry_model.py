"""A registered candidate is an MLflow ONNX model with its signature, the verified file, a description.

Against a real MLflow store (SQLite, local artifacts); the checkpoint is the tiny preset's.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent import contract
from edge_agent.mlflow_io import Registry
from model.export import FP16_MARGIN_DB
from search.registry import describe_version, register_candidate

from conftest import tiny_model

DEVICE = "orin-nano"
SIZE = 16  # LR input side; the tiny preset upscales x4


@pytest.fixture
def store(tmp_path, monkeypatch):
    """(tracking URI, experiment id) of a fresh SQLite store; downloads cached under tmp_path."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # search.mlflow_util.download's cache
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = MlflowClient(uri).create_experiment("registry-tests", artifact_location=str(tmp_path / "art"))
    return uri, exp_id


def trained_run(uri: str, exp_id: str, tmp: Path, psnr: float = 27.5) -> str:
    """A finished trial run holding a tiny checkpoint and its validation PSNR-Y."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(exp_id, tags={contract.ROLE: contract.ROLE_TRIAL}).info.run_id
    net = tiny_model()  # one weight set: its export is traced once
    ckpt = tmp / f"{run_id}.pt"
    torch.save({"model_config": asdict(net.cfg), "model": net.state_dict()}, ckpt)
    client.log_artifact(run_id, str(ckpt), "checkpoint")
    client.log_metric(run_id, "val_psnr_y", psnr)
    client.set_terminated(run_id)
    return run_id


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_version_is_an_onnx_model_with_its_signature_and_the_verified_file(store, tmp_path):
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    uri, exp_id = store
    run_id = trained_run(uri, exp_id, tmp_path)
    client = MlflowClient(uri)
    before = client.get_run(run_id).info

    reg = register_candidate(uri, run_id, "m", (DEVICE,), input_size=SIZE, label="t03 C8 r2 a0.60")

    # the run's onnx/ folder is an MLflow model: ONNX flavor, signature of the static graph
    listed = {Path(f.path).name for f in client.list_artifacts(run_id, contract.ONNX_ARTIFACT_DIR)}
    assert {"MLmodel", contract.ONNX_FILE} <= listed
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/{contract.ONNX_ARTIFACT_DIR}",
            dst_path=str(tmp_path / "dl"),
            tracking_uri=uri,
        )
    )
    model = Model.load(str(local / "MLmodel"))
    assert "onnx" in model.flavors and model.flavors["onnx"]["data"] == contract.ONNX_FILE
    (x_spec,) = model.signature.inputs.inputs
    (y_spec,) = model.signature.outputs.inputs
    assert x_spec.type == np.dtype(np.float32) and x_spec.shape == (1, 3, SIZE, SIZE)
    assert y_spec.type == np.dtype(np.float32) and y_spec.shape == (1, 3, 4 * SIZE, 4 * SIZE)
    assert (
        not list(local.glob("*.data")) and len(list(local.rglob(contract.ONNX_FILE))) == 1
    )  # no external data

    # the signature names the graph's own tensors: the pyfunc flavor runs it with them
    x = np.random.default_rng(0).random(x_spec.shape, dtype=np.float32)
    out = mlflow.pyfunc.load_model(str(local)).predict({x_spec.name: x})
    assert np.asarray(out[y_spec.name]).shape == y_spec.shape

    # what the agent downloads is the file whose sha256 the version's tag carries
    version = client.get_model_version("m", reg.version)
    assert version.source == f"runs:/{run_id}/{contract.ONNX_ARTIFACT_DIR}"
    onnx_file = Registry(uri, "m").download_onnx(reg.version, tmp_path / "agent")
    assert sha256(onnx_file) == version.tags[contract.TAG_SHA256] == reg.sha256
    assert version.tags[contract.status_tag(DEVICE)] == contract.PENDING
    # the float16 check ran: its figures are on the run, its verdict on the version
    fp16_psnr = client.get_run(run_id).data.metrics["onnx_fp16_psnr_db"]
    want = contract.FP16_OK if fp16_psnr >= 27.5 + FP16_MARGIN_DB else contract.FP32_ONLY
    assert version.tags[contract.TAG_PRECISION] == want

    # the description says which trial, its quality, where the ONNX is, who is to measure it
    text = version.description
    assert text == reg.description
    assert f"`t03 C8 r2 a0.60` (run `{run_id}`)" in text
    assert "27.50 dB" in text
    assert f"`runs:/{run_id}/onnx`" in text and f"1x3x{SIZE}x{SIZE} -> 1x3x{4 * SIZE}x{4 * SIZE}" in text
    assert (
        f"- {DEVICE}: pending — waiting for an edge agent of this device type "
        f"(`edge-agent run --device {DEVICE} --tracking-uri {uri} --model-name m`)"
    ) in text.splitlines()

    # the trial run is someone else's: registering it leaves its status and end time alone
    after = client.get_run(run_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time) == ("FINISHED", before.end_time)

    # a resumed study gets the same version back, description included
    again = register_candidate(uri, run_id, "m", (DEVICE,), input_size=SIZE)
    assert (again.version, again.sha256, again.description) == (reg.version, reg.sha256, text)


def test_a_finalized_version_names_both_runs_and_every_pending_device(store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, exp_id = store
    trial = trained_run(uri, exp_id, tmp_path, psnr=26.0)
    final = trained_run(uri, exp_id, tmp_path, psnr=28.25)
    reg = register_candidate(
        uri,
        trial,
        contract.REGISTERED_MODEL,
        (DEVICE, "rpi5"),
        input_size=SIZE,
        weights_run_id=final,
        fp16=False,
    )
    v = MlflowClient(uri).get_model_version(contract.REGISTERED_MODEL, reg.version)
    # registry.fp16: false: no float16 check, so fp32 engines only and no fp16 figures
    assert v.tags[contract.TAG_PRECISION] == contract.FP32_ONLY
    assert not any(m.startswith("onnx_fp16") for m in MlflowClient(uri).get_run(final).data.metrics)
    assert v.source == f"runs:/{final}/onnx"
    assert f"Trial run `{trial}`, weights retrained in run `{final}`." in v.description
    assert "28.25 dB" in v.description  # the registered weights' PSNR, not the trial's
    pending = [line for line in v.description.splitlines() if ": pending — " in line]
    assert [line.split(":")[0] for line in pending] == [f"- {DEVICE}", "- rpi5"]
    assert "--model-name" not in v.description  # the agent's default model name


def test_the_description_never_carries_a_credential():
    text = describe_version(
        trial_run_id="abc",
        weights_run_id="abc",
        label=None,
        quality_db=None,
        source="runs:/abc/onnx",
        input_shape=(1, 3, 64, 64),
        output_shape=(1, 3, 256, 256),
        devices=(DEVICE,),
        model_name=contract.REGISTERED_MODEL,
        tracking_uri="https://user:s3cret@mlflow.example:5000",
    )
    assert "s3cret" not in text and "--tracking-uri URI`" in text
    assert "PSNR-Y: not logged" in text


def test_the_saved_model_holds_the_given_file_byte_for_byte(tmp_path):
    """save_model re-serializes the proto; the folder must keep the verified file's bytes."""
    import onnx
    from onnx import TensorProto, helper

    from search.registry import save_onnx_model

    x = helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["lr"], ["sr"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    # a field repeated at the end parses to the same model but does not survive re-serialization
    raw = proto.SerializeToString() + bytes([0x08, proto.ir_version])
    assert onnx.load_from_string(raw) == proto and raw != proto.SerializeToString()
    src = tmp_path / "verified.onnx"
    src.write_bytes(raw)

    signature = save_onnx_model(src, tmp_path / "onnx")
    assert (tmp_path / "onnx" / contract.ONNX_FILE).read_bytes() == raw
    (x_spec,), (y_spec,) = signature.inputs.inputs, signature.outputs.inputs
    assert (x_spec.name, x_spec.shape, y_spec.name, y_spec.shape) == ("lr", (1, 3, 4, 4), "sr", (1, 3, 4, 4))
