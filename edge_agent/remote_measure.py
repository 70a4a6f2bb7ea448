"""Measure an ONNX model on a device over SSH and bring the JSON back (``edge-agent remote-measure``).

The model goes to a fresh temporary folder on the device, ``edge-agent measure`` runs there, and
the folder is removed whatever happens.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.ssh import SshError, connect, open_sftp, put_file, run_remote

log = logging.getLogger(__name__)

DEFAULT_AGENT_CMD = "~/edge-agent/venv/bin/edge-agent"


def remote_measure(
    target: str,
    model: Path,
    *,
    measure_args: Sequence[str] = (),
    agent_cmd: str = DEFAULT_AGENT_CMD,
    command_timeout_s: float = 3600.0,
    **connect_kw: Any,
) -> dict[str, Any]:
    """Copy an ONNX model to the device, run ``edge-agent measure`` there and return its JSON.

    Args:
        target: ``user@host[:port]``.
        model: the local ONNX file (a single file: external-data tensors are not copied).
        measure_args: extra ``edge-agent measure`` arguments (``--duration-s 10``...).
        agent_cmd: how to run the agent on the device; a shell command, left unquoted so ``~``
            expands (e.g. ``python3 -m edge_agent``).
        command_timeout_s: for the measurement (a TensorRT engine build can take minutes).
        **connect_kw: for :func:`edge_agent.ssh.connect`.

    Returns:
        The measurement, as ``edge-agent measure`` printed it.
    """
    model = Path(model)
    if not model.is_file():
        raise SshError(f"The model file {model} does not exist.")
    q = shlex.quote
    client = connect(target, **connect_kw)
    label = client.edge_target
    try:
        tmp = run_remote(client, 'mktemp -d "${TMPDIR:-/tmp}/edge-agent.XXXXXX"', timeout_s=60)[0].strip()
        if not tmp.startswith("/") or "\n" in tmp:
            raise SshError(f"`mktemp -d` on {label} printed {tmp!r}, not a folder.")
        try:
            remote_model = f"{tmp}/{model.name}"
            with open_sftp(client, label) as sftp:
                put_file(sftp, label, model, remote_model)
            cmd = " ".join([agent_cmd, "measure", q(remote_model), *map(q, measure_args)])
            log.info("%s: %s", label, cmd)
            stdout = run_remote(client, cmd, timeout_s=command_timeout_s)[0]
        finally:
            try:
                run_remote(client, f"rm -rf {q(tmp)}", timeout_s=60)
            except SshError as e:
                log.warning("Could not remove %s on %s: %s", tmp, label, e)
    finally:
        client.close()
    try:
        result = json.loads(stdout)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise SshError(
            f"`{cmd}` on {label} did not print a JSON object; its output began: {stdout[:300]!r}. "
            "Check that --agent-cmd runs an edge-agent with the `measure` command."
        )
    return result
