"""The cluster files, checked offline with Ray's own autoscaler config validation."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "ray_cluster.local.yaml"])
def test_cluster_file_passes_ray_validation(name):
    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    # every node runs scripts/cluster_node.sh, the commands tests/test_ray_up.py brings a cluster up with
    assert config["setup_commands"] == ["bash ~/mambalitesr/scripts/cluster_node.sh setup"]
    assert config["head_start_ray_commands"] == ["bash ~/mambalitesr/scripts/cluster_node.sh start-head"]
    assert config["worker_start_ray_commands"] == [
        "bash ~/mambalitesr/scripts/cluster_node.sh start-worker $RAY_HEAD_IP"
    ]
    node = (ROOT / "scripts" / "cluster_node.sh").read_text()
    assert 'pip install --quiet --no-compile -e "$REPO"' in node  # the project is installed on every node
    assert "start_mlflow.sh" in node  # the head runs the tracking server
    assert (ROOT / "scripts" / "head_search.sh").exists()
    # the header's commands are the ones the tested file documents
    header = [line for line in (ROOT / name).read_text().splitlines() if line.startswith("#   ray ")]
    assert any("ray exec" in line and "head_search.sh" in line for line in header), header


def test_validation_catches_a_broken_file():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["node_confg"] = config["available_node_types"][
        "gpu_worker"
    ].pop("node_config")
    with pytest.raises(Exception, match="node_confg|node_config"):
        validate_config(prepare_config(config))
