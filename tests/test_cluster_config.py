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
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "pip install" in commands and "-e ." in commands  # the project is installed on every node
    assert "start_mlflow.sh" in commands  # the head runs the tracking server
    assert (ROOT / "scripts" / "start_mlflow.sh").exists() and (ROOT / "scripts" / "head_search.sh").exists()


def test_validation_catches_a_broken_file():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["node_confg"] = config["available_node_types"][
        "gpu_worker"
    ].pop("node_config")
    with pytest.raises(Exception, match="node_confg|node_config"):
        validate_config(prepare_config(config))
