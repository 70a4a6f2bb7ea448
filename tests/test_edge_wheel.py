"""edge_agent.wheel: the device's wheel holds the agent alone and imports neither torch nor ray."""

from __future__ import annotations

import zipfile

import pytest

from edge_agent import wheel
from edge_agent.ssh import SshError


def test_build_agent_wheel_holds_the_agent_alone(tmp_path):
    built = wheel.build_agent_wheel(tmp_path)
    assert built.parent == tmp_path and built.name.startswith("mambalitesr_edge_agent-0.1.0-")
    with zipfile.ZipFile(built) as zf:
        names = zf.namelist()
        meta = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {"edge_agent/contract.py", "edge_agent/ssh.py", "edge_agent/systemd/edge-agent.service.in"} <= set(
        names
    )
    assert {f"edge_agent/{m}.py" for m in ("cli", "deploy", "remote_measure", "wheel")} <= set(names)
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"model", "search", "trainers", "tests"}, tops
    assert not [n for n in names if "__pycache__" in n or "packaging/" in n]
    assert "Requires-Python: >=3.10" in meta
    for dep in ("numpy>=1.24", "onnxruntime>=1.18", "mlflow-skinny>=2.12"):
        assert f"Requires-Dist: {dep}" in meta
    assert "torch" not in meta and "ray" not in meta.lower().replace("array", "")
    assert "edge-agent = edge_agent.cli:main" in entry_points


def test_wheel_check_refuses_torch(tmp_path):
    bad = tmp_path / "bad-0.1-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("edge_agent/contract.py", "X = 1\n")
        zf.writestr("edge_agent/systemd/edge-agent.service.in", "")
        zf.writestr("edge_agent/helper.py", "def f():\n    from torch import nn\n")
        zf.writestr("model/net.py", "")
    with pytest.raises(SshError, match="not fit for a device") as info:
        wheel._check_wheel(bad)
    assert "imports torch in edge_agent/helper.py" in str(info.value)
    assert "more than edge_agent: model" in str(info.value)
