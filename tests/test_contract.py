"""The MLflow contract between the search and the agent: its key helpers."""

from edge_agent import contract


def test_an_edge_key_splits_back_into_its_device_and_name():
    assert contract.split_edge_key(contract.status_tag("orin-nano")) == ("orin-nano", "status")
    key = contract.edge_key("cpu", contract.LATENCY_P50)
    assert contract.split_edge_key(key) == ("cpu", "latency_ms_p50")
    assert contract.split_edge_key("selection.rule") is None
    assert contract.split_edge_key("edge.orin-nano") is None
