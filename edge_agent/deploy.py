"""Install the agent on a device over SSH and start it as a systemd service (``edge-agent deploy``).

The agent's wheel (``edge_agent.wheel``) is copied to ``<remote_dir>`` on the device and installed
in a venv there; the unit rendered from systemd/edge-agent.service.in runs ``edge-agent run`` as
the SSH user. Secrets for the agent (MLflow tokens) live in ``<remote_dir>/agent.env`` on the
device, never in the unit file or on a command line.
"""

from __future__ import annotations

import logging
import re
import shlex
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import contract
from edge_agent.ssh import (
    SshError,
    connect,
    open_sftp,
    parse_target,
    put_file,
    put_text,
    run_remote,
    target_label,
)
from edge_agent.wheel import DISTRIBUTION, PACKAGE_DIR, build_agent_wheel

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

UNIT_TEMPLATE = PACKAGE_DIR / "systemd" / "edge-agent.service.in"
DEFAULT_REMOTE_DIR = "~/edge-agent"
# Templates with $unit, $remote_dir, $venv (shell-quoted when substituted). `sudo -n` fails at once
# where sudo wants a password, instead of waiting for one that cannot be typed.
DEFAULT_SERVICE_CMDS = (
    "sudo -n install -m 0644 $unit /etc/systemd/system/edge-agent.service",
    "sudo -n systemctl daemon-reload",
    "sudo -n systemctl enable edge-agent",
    # restart, not start: it starts a stopped agent and replaces a running one with the new code
    "sudo -n systemctl restart edge-agent",
)
# Characters left bare in paths that end up in the unit file and in shell commands.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_@+=:,./~-]+")
_SAFE_UNIT_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


@dataclass(frozen=True)
class DeployReport:
    host: str  # user@host[:port], as connected to
    wheel: str  # file name of the installed agent wheel
    venv: str  # absolute path of the venv on the device
    unit: str  # absolute path of the rendered systemd unit on the device
    commands: tuple[str, ...]  # every remote shell command run, in order


# --------------------------------------------------------------------------------------------------
# the unit


def render_unit(*, venv: str, user: str, workdir: str, agent_args: Sequence[str]) -> str:
    """The systemd unit for ``edge-agent run <agent_args>``, each argument quoted for systemd."""
    for what, value in (("venv", venv), ("workdir", workdir), ("user", user)):
        if not _SAFE_PATH.fullmatch(value):
            raise SshError(
                f"The {what} {value!r} has characters a unit file cannot hold bare; choose a plain one."
            )
    args = " ".join(_systemd_quote(a) for a in agent_args)
    return string.Template(UNIT_TEMPLATE.read_text()).substitute(
        venv=venv, user=user, workdir=workdir, args=args
    )


def _systemd_quote(arg: str) -> str:
    """Quote one ExecStart word: systemd unescapes C-style inside quotes, expands %x and $VAR."""
    if any(ord(c) < 32 for c in arg):
        raise SshError(f"The agent argument {arg!r} holds a control character; a unit file cannot carry it.")
    if not _SAFE_UNIT_WORD.fullmatch(arg):
        arg = '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg.replace("%", "%%").replace("$", "$$")


# --------------------------------------------------------------------------------------------------
# deploy


def deploy(
    target: str,
    *,
    tracking_uri: str,
    device: str,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    python: str = "python3",
    venv_args: Sequence[str] = ("--system-site-packages",),
    pip_args: Sequence[str] = (),
    agent_args: Sequence[str] = (),
    service_cmds: Sequence[str] | None = None,
    command_timeout_s: float = 1800.0,
    **connect_kw: Any,
) -> DeployReport:
    """Install the agent in a venv on the device and start it as a systemd service.

    Args:
        target: ``user@host[:port]``; the service runs as that user.
        tracking_uri: the MLflow server; credentials go in ``<remote_dir>/agent.env``, not here.
        device: the device name the agent claims candidates for.
        remote_dir: folder on the device for the wheel, venv, unit and agent.env (``~`` is the
            remote home).
        python: the device's interpreter for the venv (3.10 or newer).
        venv_args: for ``python -m venv``; ``--system-site-packages`` by default because on a
            Jetson TensorRT's Python bindings come from JetPack's system packages, not from PyPI.
        pip_args: extra ``pip install`` arguments (a mirror, ``--no-index``...).
        agent_args: extra ``edge-agent run`` arguments, after ``--tracking-uri`` and ``--device``.
        service_cmds: shell command templates run last ($unit, $remote_dir, $venv); None runs
            DEFAULT_SERVICE_CMDS (install, enable and restart the systemd service).
        command_timeout_s: for each remote command (pip on a Jetson can take minutes).
        **connect_kw: for :func:`edge_agent.ssh.connect`.
    """
    if contract.uri_credential_problem(tracking_uri):
        raise SshError(
            "The tracking URI carries a credential, which would end up in the unit file and in `ps`. "
            f"Give it without one and put MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
            f"MLFLOW_TRACKING_TOKEN in {remote_dir}/agent.env on the device (mode 0600)."
        )
    if not tracking_uri or not device.strip():
        raise SshError("deploy needs a tracking URI and a device name.")
    user = parse_target(target)[0]
    q = shlex.quote
    with tempfile.TemporaryDirectory(prefix="edge-agent-deploy-") as tmp:
        wheel = build_agent_wheel(Path(tmp))
        client = connect(target, **connect_kw)
        label = client.edge_target
        commands: list[str] = []

        def run(cmd: str) -> str:
            log.info("%s: %s", label, cmd)
            commands.append(cmd)
            return run_remote(client, cmd, timeout_s=command_timeout_s)[0]

        try:
            root = _remote_dir(client, remote_dir)
            venv, unit, env_file = f"{root}/venv", f"{root}/edge-agent.service", f"{root}/agent.env"
            remote_wheel = f"{root}/{wheel.name}"
            unit_text = render_unit(
                venv=venv,
                user=user,
                workdir=root,
                agent_args=["--tracking-uri", tracking_uri, "--device", device, *agent_args],
            )
            run(f"mkdir -p {q(root)} && rm -f {q(root)}/{DISTRIBUTION.replace('-', '_')}-*.whl")
            with open_sftp(client, label) as sftp:
                put_file(sftp, label, wheel, remote_wheel)
                _ensure_env_file(sftp, label, env_file)
            run(
                f"test -x {q(venv)}/bin/python || {q(python)} -m venv {' '.join(map(q, venv_args))} {q(venv)}"
            )
            version = run(
                f"{q(venv)}/bin/python -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'"
            ).strip()
            if tuple(int(p) for p in version.split(".")) < (3, 10):
                raise SshError(
                    f"The venv {venv} on {label} runs Python {version}; the agent needs 3.10 or newer. "
                    "Remove that venv and pass --python with a newer interpreter (JetPack 6 has python3.10)."
                )
            pip = f"{q(venv)}/bin/python -m pip --disable-pip-version-check"
            extra = " ".join(map(q, pip_args))
            run(f"{pip} install --quiet {extra} {q(remote_wheel)}")  # the agent and its dependencies
            # same version number, new code: replace the agent alone, keeping the installed dependencies
            run(f"{pip} install --quiet --force-reinstall --no-deps {extra} {q(remote_wheel)}")
            with open_sftp(client, label) as sftp:
                put_text(sftp, label, unit_text, unit)
            mapping = {"unit": q(unit), "remote_dir": q(root), "venv": q(venv)}
            for template in DEFAULT_SERVICE_CMDS if service_cmds is None else service_cmds:
                try:
                    run(string.Template(template).safe_substitute(mapping))
                except SshError as e:
                    by_hand = "; ".join(
                        string.Template(t).safe_substitute(mapping) for t in DEFAULT_SERVICE_CMDS
                    )
                    raise SshError(
                        f"{e}\nThe agent is installed in {venv} and its unit is at {unit} on {label}. Fix "
                        f"the above and deploy again, or set the service up yourself there: {by_hand}"
                    ) from None
        finally:
            client.close()
    return DeployReport(host=label, wheel=wheel.name, venv=venv, unit=unit, commands=tuple(commands))


def _remote_dir(client: paramiko.SSHClient, path: str) -> str:
    """An absolute remote path, ``~`` replaced with the remote home, checked for plain characters."""
    if path == "~" or path.startswith("~/"):
        home = run_remote(client, 'printf %s "$HOME"', timeout_s=60)[0].strip()
        if not home.startswith("/"):
            raise SshError(f"$HOME on {target_label(client)} is {home!r}; pass an absolute --remote-dir.")
        path = home.rstrip("/") + path[1:]
    if not path.startswith("/"):
        raise SshError(f"The remote dir {path!r} must be absolute or start with ~/.")
    if not _SAFE_PATH.fullmatch(path) or "~" in path:
        raise SshError(f"The remote dir {path!r} has spaces or shell characters; choose a plain path.")
    return path.rstrip("/") or "/"


def _ensure_env_file(sftp: paramiko.SFTPClient, label: str, path: str) -> None:
    """Create an empty agent.env (mode 0600) for secrets, or warn when others can read the one there."""
    try:
        mode = sftp.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise SshError(f"Could not check {label}:{path}: {e}") from e
    if mode is not None:
        if mode & 0o077:
            log.warning("%s:%s can be read by other users; `chmod 600` it (it holds secrets).", label, path)
        return
    note = "# KEY=value lines for the agent's environment, e.g. MLFLOW_TRACKING_TOKEN=...; keep mode 0600.\n"
    try:
        with sftp.open(path, "w") as f:
            f.chmod(0o600)
            f.write(note)
    except OSError as e:
        raise SshError(f"Creating {label}:{path} failed: {e}") from e
