"""The device's wheel: the edge_agent package alone, checked to import neither torch nor ray.

``edge-agent deploy`` (``edge_agent.deploy``) builds it on the workstation and installs it on the
device; packaging/pyproject.toml is its project file, with the main project's version put in.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edge_agent.ssh import SshError, output_tail

PACKAGE_DIR = Path(__file__).resolve().parent
AGENT_PYPROJECT = PACKAGE_DIR / "packaging" / "pyproject.toml"
DISTRIBUTION = "mambalitesr-edge-agent"
FORBIDDEN_IMPORTS = frozenset({"torch", "ray"})  # a Jetson install stays light


def build_agent_wheel(out_dir: Path) -> Path:
    """Build the device's wheel: the edge_agent package alone, with packaging/pyproject.toml.

    Returns:
        The wheel's path in ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-agent-wheel-") as tmp:
        stage, dist = Path(tmp) / "stage", Path(tmp) / "dist"
        shutil.copytree(
            PACKAGE_DIR,
            stage / "edge_agent",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "packaging", "*.egg-info"),
        )
        pyproject = re.sub(
            r'^version = "[^"]*"$',
            f'version = "{_project_version()}"',
            AGENT_PYPROJECT.read_text(),
            count=1,
            flags=re.M,
        )
        (stage / "pyproject.toml").write_text(pyproject)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"]
        cmd += ["-w", str(dist), str(stage)]
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        wheels = sorted(dist.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise SshError(
                f"Building the edge-agent wheel failed (`{shlex.join(cmd)}` exited {proc.returncode}). "
                f"{output_tail(proc.stderr or proc.stdout)}"
            )
        _check_wheel(wheels[0])
        dest = out_dir / wheels[0].name
        shutil.copyfile(wheels[0], dest)
    return dest


def _project_version() -> str:
    """The main project's version when run from a checkout, else the device pyproject's own."""
    main = PACKAGE_DIR.parent / "pyproject.toml"
    if main.is_file():
        found = re.search(r'(?ms)^\[project\]$.*?^version\s*=\s*"([^"]+)"', main.read_text())
        if found:
            return found.group(1)
    return re.search(r'^version = "([^"]*)"$', AGENT_PYPROJECT.read_text(), flags=re.M).group(1)


def _check_wheel(wheel: Path) -> None:
    """Refuse a wheel that lacks the agent or would make the device import torch or ray."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        required = {"edge_agent/contract.py", "edge_agent/systemd/edge-agent.service.in"}
        missing = sorted(required - set(names))
        tops = {n.split("/")[0] for n in names}
        others = sorted(t for t in tops if t != "edge_agent" and not t.endswith(".dist-info"))
        heavy = {}
        for name in names:
            if name.endswith(".py"):
                roots = _imported_roots(ast.parse(zf.read(name), filename=name)) & FORBIDDEN_IMPORTS
                if roots:
                    heavy[name] = sorted(roots)
    problems = []
    if missing:
        problems.append(f"it lacks {', '.join(missing)}")
    if others:
        problems.append(f"it holds more than edge_agent: {', '.join(others)}")
    if heavy:
        problems.append("it imports " + "; ".join(f"{', '.join(r)} in {n}" for n, r in heavy.items()))
    if problems:
        raise SshError(
            f"The edge-agent wheel {wheel.name} is not fit for a device: {'; '.join(problems)}. "
            "edge_agent/ must stay free of torch and ray: a device installs it alone."
        )


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots
