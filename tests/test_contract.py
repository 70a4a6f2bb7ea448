"""The MLflow contract between the search and the agent: its key helpers."""

import pytest

from edge_agent import contract


def test_an_edge_key_splits_back_into_its_device_and_name():
    assert contract.split_edge_key(contract.status_tag("orin-nano")) == ("orin-nano", "status")
    key = contract.edge_key("cpu", contract.LATENCY_P50)
    assert contract.split_edge_key(key) == ("cpu", "latency_ms_p50")
    assert contract.split_edge_key("selection.rule") is None
    assert contract.split_edge_key("edge.orin-nano") is None


def test_the_measurement_artifact_is_one_file_per_device_type():
    assert contract.measurement_artifact("orin-nano") == "edge/orin-nano/measurement.json"
    assert contract.measurement_artifact("cpu") != contract.measurement_artifact("orin-nano")
    with pytest.raises(ValueError, match="device name"):
        contract.measurement_artifact("../orin-nano")  # a device name is never a path


def test_a_versions_status_line_is_replaced_in_place_or_added_under_the_heading():
    pending = "- cpu: pending — waiting for an edge agent of this device type (`edge-agent run ...`)"
    text = "\n".join(
        ["Trial `t01`.", "", contract.STATUS_HEADING, "- jet: pending — waiting", pending, "", "end"]
    )
    done = contract.status_line(
        "cpu",
        contract.DONE,
        {contract.LATENCY_MEAN: 2.5386, contract.LATENCY_STD: 0.266, contract.LATENCY_P99: 4.1},
        {contract.TAG_BACKEND: "onnxruntime", contract.TAG_POWER_SOURCE: "unavailable"},
    )
    assert done == (
        "- cpu: done — latency 2.539 ms mean (SD 0.27 ms across windows), p99 4.1 ms; "
        "no power figure (power source: unavailable) (onnxruntime)"
    )
    new = contract.with_status_line(text, "cpu", done)
    assert new == text.replace(pending, done)  # in place, the other device's line kept
    assert contract.with_status_line(new, "cpu", done) == new  # a retried report changes nothing
    failed = contract.status_line("gpu", contract.FAILED, {}, {}, "TensorRT: no engine\ntrace")
    assert failed == "- gpu: failed — TensorRT: no engine"
    added = contract.with_status_line(new, "gpu", failed).split("\n")
    assert added.index(failed) == added.index(done) + 1 and added[-1] == "end"  # under the heading
    bare = contract.with_status_line("Trial `t02`.", "cpu", done).split("\n")
    assert bare == ["Trial `t02`.", "", contract.STATUS_HEADING, done]
    power = contract.status_line(
        "jet", contract.DONE, {contract.LATENCY_P50: 3.0, contract.POWER: 4012.4, contract.ENERGY: 0.512}, {}
    )
    assert power == "- jet: done — latency 3 ms mean; power 4012 mW, 0.512 mJ/image"
