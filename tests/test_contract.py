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
