"""Install the agent on a device and measure a model there, over SSH (the workstation side).

Security by default, like OpenSSH with StrictHostKeyChecking=yes: the device's host key is checked
against /etc/ssh/ssh_known_hosts and ~/.ssh/known_hosts (or one file given with ``known_hosts``);
an unknown key is refused unless ``accept_new_host_key`` (OpenSSH's ``accept-new``: the key is
added to the file and a warning names its fingerprint), and a changed key is always refused. Only
key authentication (ssh-agent, ~/.ssh/id_*, or ``identity``): no password is asked for, taken or
logged. Secrets for the agent (MLflow tokens) live in ``<remote_dir>/agent.env`` on the device,
never in the unit file or on a command line.

paramiko is imported inside the functions that need it: the daemon on the device never does.
"""

from __future__ import annotations

import argparse
import ast
import base64
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import argtypes, contract

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
UNIT_TEMPLATE = PACKAGE_DIR / "systemd" / "edge-agent.service.in"
AGENT_PYPROJECT = PACKAGE_DIR / "packaging" / "pyproject.toml"
DISTRIBUTION = "mambalitesr-edge-agent"
SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
USER_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
DEFAULT_REMOTE_DIR = "~/edge-agent"
DEFAULT_AGENT_CMD = "~/edge-agent/venv/bin/edge-agent"
# Templates with $unit, $remote_dir, $venv (shell-quoted when substituted). `sudo -n` fails at once
# where sudo wants a password, instead of waiting for one that cannot be typed.
DEFAULT_SERVICE_CMDS = (
    "sudo -n install -m 0644 $unit /etc/systemd/system/edge-agent.service",
    "sudo -n systemctl daemon-reload",
    "sudo -n systemctl enable edge-agent",
    # restart, not start: it starts a stopped agent and replaces a running one with the new code
    "sudo -n systemctl restart edge-agent",
)
FORBIDDEN_IMPORTS = frozenset({"torch", "ray"})  # a Jetson install stays light
# Characters left bare in paths that end up in the unit file and in shell commands.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_@+=:,./~-]+")
_SAFE_UNIT_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
_STDERR_TAIL_LINES = 15


class SshError(RuntimeError):
    """A failure reaching, installing on or measuring on a device, worded for the user."""


@dataclass(frozen=True)
class DeployReport:
    host: str  # user@host[:port], as connected to
    wheel: str  # file name of the installed agent wheel
    venv: str  # absolute path of the venv on the device
    unit: str  # absolute path of the rendered systemd unit on the device
    commands: tuple[str, ...]  # every remote shell command run, in order


# --------------------------------------------------------------------------------------------------
# connecting


def parse_target(target: str) -> tuple[str, str, int | None]:
    """Split ``user@host[:port]`` (IPv6 as ``user@[::1]:2222``).

    Returns:
        (user, host, port); port is None when the target names none.
    """
    user, at, rest = target.rpartition("@")
    if not at or not user or not rest:
        raise SshError(
            f"SSH target {target!r} is not user@host[:port]: name the login on the device too, "
            "e.g. nvidia@jetson.local or nvidia@192.168.1.20:2222."
        )
    port_text: str | None = None
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise SshError(
                f"SSH target {target!r}: write an IPv6 address as user@[addr] or user@[addr]:port."
            )
        port_text = tail[1:] if tail else None
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:  # a plain host name, or a bare IPv6 address (which cannot carry a port)
        host = rest
    if not host:
        raise SshError(f"SSH target {target!r} names no host; give it as user@host[:port].")
    port = None
    if port_text is not None:
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 < int(port_text) < 65536:
            raise SshError(f"SSH target {target!r}: port {port_text!r} is not a number from 1 to 65535.")
        port = int(port_text)
    return user, host, port


def connect(
    target: str,
    *,
    port: int | None = None,
    identity: str | Path | None = None,
    known_hosts: str | Path | None = None,
    accept_new_host_key: bool = False,
    timeout_s: float = 15.0,
) -> paramiko.SSHClient:
    """Open an SSH connection with host-key checking and key authentication only.

    Args:
        target: ``user@host[:port]``.
        port: the SSH port when the target names none (default 22).
        identity: a private key file; without it, keys from ssh-agent and ~/.ssh/id_*.
        known_hosts: the one known_hosts file to check (and add to); without it,
            /etc/ssh/ssh_known_hosts and ~/.ssh/known_hosts.
        accept_new_host_key: trust an unknown host key on first use and add it to known_hosts.
        timeout_s: for the TCP connection, the SSH banner and authentication each.

    Returns:
        A connected ``paramiko.SSHClient``; its ``edge_target`` attribute is the label used in errors.
    """
    paramiko = _import_paramiko()
    user, host, target_port = parse_target(target)
    if port is not None and target_port is not None and port != target_port:
        raise SshError(f"SSH target {target!r} names port {target_port} but --port says {port}; give one.")
    port = port or target_port or 22
    label = f"{user}@{host}" + (f":{port}" if port != 22 else "")
    host_key_name = host if port == 22 else f"[{host}]:{port}"
    if identity is not None:
        identity = Path(identity).expanduser()
        if not identity.is_file():
            raise SshError(f"The identity file {identity} for {label} does not exist; pass the private key.")

    if known_hosts is not None:
        key_files = [Path(known_hosts).expanduser()]
        where = f"the known_hosts file {key_files[0]}"
    else:
        key_files = [SYSTEM_KNOWN_HOSTS, USER_KNOWN_HOSTS.expanduser()]
        where = f"{SYSTEM_KNOWN_HOSTS} or {USER_KNOWN_HOSTS}"
    client = paramiko.SSHClient()
    for path in key_files:
        if path.is_file():
            try:
                client.get_host_keys().load(str(path))
            except (OSError, paramiko.SSHException) as e:
                raise SshError(f"Could not read the known_hosts file {path}: {e}") from e
    client.set_missing_host_key_policy(
        _HostKeyPolicy(label, user, host, port, key_files[-1], where, accept_new=accept_new_host_key)
    )
    offered = (
        f"the key {identity} or ssh-agent's keys" if identity else "the keys in ssh-agent and ~/.ssh/id_*"
    )
    try:
        client.connect(
            host,
            port=port,
            username=user,
            key_filename=str(identity) if identity else None,
            look_for_keys=identity is None,
            allow_agent=True,
            timeout=timeout_s,
            banner_timeout=timeout_s,
            auth_timeout=timeout_s,
        )
    except SshError:
        client.close()
        raise
    except paramiko.BadHostKeyException as e:
        client.close()
        raise SshError(
            f"The host key of {label} has CHANGED: it presented {e.key.get_name()} {_fingerprint(e.key)}, "
            f"but {where} holds {e.expected_key.get_name()} {_fingerprint(e.expected_key)}. Refusing to "
            "connect: someone may be intercepting the connection. If the device was reinstalled, remove "
            f"the old key with `ssh-keygen -R '{host_key_name}' -f {key_files[-1]}` and connect again."
        ) from None
    except paramiko.PasswordRequiredException:
        client.close()
        raise SshError(
            f"SSH to {label}: the private key {identity or '(in ~/.ssh)'} is encrypted and no passphrase is "
            f"asked for here; load it into ssh-agent with `ssh-add {identity or '<key>'}` and try again."
        ) from None
    except paramiko.AuthenticationException as e:
        client.close()
        raise SshError(
            f"SSH key authentication to {label} failed ({e}): the device accepted none of {offered}. "
            f"Install your public key there with `ssh-copy-id -p {port} {user}@{host}`, or pass "
            "--identity FILE. Passwords are not supported."
        ) from None
    except paramiko.SSHException as e:
        client.close()
        if "No authentication methods available" in str(e):
            raise SshError(
                f"SSH to {label}: no private key to offer (looked for {offered}); start ssh-agent and "
                "`ssh-add` your key, or pass --identity FILE. Passwords are not supported."
            ) from None
        raise SshError(f"The SSH connection to {label} failed: {e}.") from None
    except OSError as e:  # refused, unreachable, timed out, unknown name
        client.close()
        raise SshError(
            f"Could not reach {label}: {e or type(e).__name__}. Check that the device is on, the address "
            f"is right, and sshd listens on port {port}."
        ) from None
    client.edge_target = label  # for errors from run_remote
    return client


class _HostKeyPolicy:
    """paramiko's missing-host-key hook: refuse, or (accept-new) append the key to known_hosts."""

    def __init__(
        self, label: str, user: str, host: str, port: int, save_to: Path, where: str, *, accept_new: bool
    ):
        self.label, self.login, self.host, self.port = label, f"{user}@{host}", host, port
        self.save_to, self.where, self.accept_new = save_to, where, accept_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        fingerprint = f"{key.get_name()} {_fingerprint(key)}"
        if not self.accept_new:
            raise SshError(
                f"The host key of {self.label} ({fingerprint}) is not in {self.where}: refusing to connect "
                "to an unknown host. Check the fingerprint with the device (`ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub` there), then either add it with "
                f"`ssh-keyscan -p {self.port} {self.host} >> {self.save_to}`, connect once with "
                f"`ssh -p {self.port} {self.login}` and answer yes, or pass --accept-new-host-key to trust "
                "it on first use."
            )
        _append_known_host(self.save_to, hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning(
            "Trusting the new host key of %s on first use and adding it to %s: %s. Connections that "
            "present another key will be refused.",
            self.label,
            self.save_to,
            fingerprint,
        )


def _append_known_host(path: Path, hostname: str, key: paramiko.PKey) -> None:
    """Append one line, leaving the rest of the file (comments, hashed names, markers) alone."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        prefix = ""
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                prefix = "" if f.read(1) == b"\n" else "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{prefix}{hostname} {key.get_name()} {key.get_base64()}\n")
    except OSError as e:
        raise SshError(f"Could not add the host key of {hostname} to {path}: {e}") from e


def _fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form, as `ssh-keygen -lf` prints it: SHA256:<base64 without padding>."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _import_paramiko():
    try:
        import paramiko
    except ImportError:
        raise SshError(
            "edge-agent deploy and remote-measure need paramiko on this machine: pip install 'paramiko>=3'."
        ) from None
    return paramiko


def _label(client: paramiko.SSHClient) -> str:
    label = getattr(client, "edge_target", None)
    if label:
        return label
    transport = client.get_transport()
    peer = transport.getpeername() if transport is not None and transport.sock is not None else None
    return f"{peer[0]}:{peer[1]}" if peer else "the device"


def run_remote(client: paramiko.SSHClient, command: str, *, timeout_s: float) -> tuple[str, str]:
    """Run a shell command on the device; quote its arguments with shlex.quote.

    Returns:
        (stdout, stderr) decoded as UTF-8.

    Raises:
        SshError: when the command exits non-zero (with the last lines of its stderr) or runs past
            ``timeout_s``.
    """
    label = _label(client)
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise SshError(f"The SSH connection to {label} is closed; cannot run `{command}`.")
    try:
        chan = transport.open_session(timeout=timeout_s)
    except Exception as e:  # paramiko.SSHException or a socket error
        raise SshError(f"Could not open a session on {label} to run `{command}`: {e}") from e
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        chan.exec_command(command)
        # Drain both streams as they arrive: a command that fills one pipe while the other is read
        # would block. Done once EOF and the exit status are both in (sshd may send them in either
        # order), or the channel is closed.
        while True:
            idle = True
            while chan.recv_ready():
                out += chan.recv(65536)
                idle = False
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                idle = False
            if idle:
                if chan.closed or (chan.eof_received and chan.exit_status_ready()):
                    break
                if time.monotonic() > deadline:
                    raise SshError(
                        f"`{command}` on {label} did not finish within {timeout_s:g} s; "
                        f"{_tail(err.decode(errors='replace') or out.decode(errors='replace'))}"
                    )
                time.sleep(0.005)
        status = chan.exit_status if chan.exit_status_ready() else -1
    finally:
        chan.close()
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if status != 0:
        what = f"exited with status {status}" if status >= 0 else "was killed (no exit status)"
        raise SshError(f"`{command}` on {label} {what}. {_tail(stderr or stdout)}")
    return stdout, stderr


def _tail(text: str) -> str:
    lines = text.strip().splitlines()[-_STDERR_TAIL_LINES:]
    return ("Its last output:\n  " + "\n  ".join(lines)) if lines else "It printed nothing."


# --------------------------------------------------------------------------------------------------
# the agent wheel and the unit


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
                f"{_tail(proc.stderr or proc.stdout)}"
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
            "edge_agent/ must stay free of torch and ray (see DESIGN.md)."
        )


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


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
# deploy and remote-measure


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
        **connect_kw: for :func:`connect`.
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
            with _sftp(client, label) as sftp:
                _put(sftp, label, wheel, remote_wheel)
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
            with _sftp(client, label) as sftp:
                _put_text(sftp, label, unit_text, unit)
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
        **connect_kw: for :func:`connect`.

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
            with _sftp(client, label) as sftp:
                _put(sftp, label, model, remote_model)
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


def _remote_dir(client: paramiko.SSHClient, path: str) -> str:
    """An absolute remote path, ``~`` replaced with the remote home, checked for plain characters."""
    if path == "~" or path.startswith("~/"):
        home = run_remote(client, 'printf %s "$HOME"', timeout_s=60)[0].strip()
        if not home.startswith("/"):
            raise SshError(f"$HOME on {_label(client)} is {home!r}; pass an absolute --remote-dir.")
        path = home.rstrip("/") + path[1:]
    if not path.startswith("/"):
        raise SshError(f"The remote dir {path!r} must be absolute or start with ~/.")
    if not _SAFE_PATH.fullmatch(path) or "~" in path:
        raise SshError(f"The remote dir {path!r} has spaces or shell characters; choose a plain path.")
    return path.rstrip("/") or "/"


def _sftp(client: paramiko.SSHClient, label: str):
    try:
        return client.open_sftp()
    except Exception as e:  # paramiko.SSHException when the server has no sftp subsystem
        raise SshError(
            f"Could not open SFTP on {label}: {e}. The device's sshd needs a `Subsystem sftp` line in "
            "sshd_config."
        ) from e


def _put(sftp: paramiko.SFTPClient, label: str, local: Path, remote: str) -> None:
    try:
        sftp.put(str(local), remote)
    except OSError as e:
        raise SshError(f"Copying {local} to {label}:{remote} failed: {e}") from e


def _put_text(sftp: paramiko.SFTPClient, label: str, text: str, remote: str) -> None:
    try:
        with sftp.open(remote, "w") as f:
            f.write(text)
    except OSError as e:
        raise SshError(f"Writing {label}:{remote} failed: {e}") from e


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


# --------------------------------------------------------------------------------------------------
# command line


def _port(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    port = argtypes.positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text}")
    return port


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``deploy`` and ``remote-measure`` to the edge-agent command line."""
    from edge_agent.cli import device_name  # the device agent's own check of the name

    conn = argparse.ArgumentParser(add_help=False)
    group = conn.add_argument_group("SSH connection")
    group.add_argument(
        "--identity", type=Path, help="private key file (default: ssh-agent, then ~/.ssh/id_*)"
    )
    group.add_argument(
        "--known-hosts",
        type=Path,
        help="the known_hosts file to check, and to add to with --accept-new-host-key "
        f"(default: {SYSTEM_KNOWN_HOSTS} and {USER_KNOWN_HOSTS})",
    )
    group.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust an unknown host key on first use and add it to known_hosts (OpenSSH's "
        "StrictHostKeyChecking=accept-new); a changed key is refused all the same",
    )
    group.add_argument("--port", type=_port, help="SSH port when TARGET names none (default 22)")

    p = subparsers.add_parser(
        "deploy",
        parents=[conn],
        help="install the agent on a device over SSH and start it as a systemd service",
        description="Build the agent's wheel (edge_agent alone), copy it to the device, install it in a "
        "venv there and start `edge-agent run` as the systemd service edge-agent. Secrets such as "
        "MLFLOW_TRACKING_TOKEN go in REMOTE_DIR/agent.env on the device, never on this command line.",
    )
    p.add_argument("target", metavar="TARGET", help="user@host[:port]; the service runs as that user")
    p.add_argument("--tracking-uri", required=True, help="MLflow tracking server, without credentials")
    p.add_argument(
        "--device",
        type=device_name,
        required=True,
        help="device name the agent measures for (e.g. orin-nano-8gb)",
    )
    p.add_argument(
        "--remote-dir", default=DEFAULT_REMOTE_DIR, help="folder on the device (default: %(default)s)"
    )
    p.add_argument(
        "--python", default="python3", help="the device's Python for the venv (default: %(default)s)"
    )
    p.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        dest="pip_args",
        help="extra pip install argument; repeat; use --pip-arg=--flag",
    )
    p.add_argument(
        "--service-cmd",
        action="append",
        dest="service_cmds",
        help="remote command run last, with $unit, $remote_dir, $venv; repeat; replaces the systemd "
        "defaults (install the unit, daemon-reload, enable, restart)",
    )
    p.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        dest="agent_args",
        help="extra `edge-agent run` argument; repeat; use --agent-arg=--poll-s --agent-arg=60",
    )
    p.set_defaults(func=_deploy_command)

    measure_opts = argparse.ArgumentParser(add_help=False, parents=[conn])
    measure_opts.add_argument(
        "--agent-cmd", default=DEFAULT_AGENT_CMD, help="the agent on the device (default: %(default)s)"
    )
    p = subparsers.add_parser(
        "remote-measure",
        parents=[measure_opts],
        help="measure an ONNX model on a device over SSH and print the JSON",
        description="Copy MODEL to a temporary folder on the device, run `edge-agent measure` there, "
        "print its JSON and remove the folder. Arguments after -- go to `edge-agent measure`.",
    )
    p.add_argument("target", metavar="TARGET", help="user@host[:port]")
    p.add_argument("model", metavar="MODEL.onnx", type=Path)
    # REMAINDER, not "*": argparse (3.10, 3.11) leaves a "*" positional empty when options sit between
    # MODEL and "--". The handler takes this command's own options back out of it.
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="-- MEASURE_ARGS", help="for `edge-agent measure`"
    )
    own = argparse.ArgumentParser(prog=p.prog, add_help=False, allow_abbrev=False, parents=[measure_opts])
    p.set_defaults(func=functools.partial(_remote_measure_command, options=own))


def _connect_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "port": args.port,
        "identity": args.identity,
        "known_hosts": args.known_hosts,
        "accept_new_host_key": args.accept_new_host_key,
    }


def _deploy_command(args: argparse.Namespace) -> int:
    try:
        report = deploy(
            args.target,
            tracking_uri=args.tracking_uri,
            device=args.device,
            remote_dir=args.remote_dir,
            python=args.python,
            pip_args=args.pip_args,
            agent_args=args.agent_args,
            service_cmds=args.service_cmds,
            **_connect_kw(args),
        )
    except SshError as e:
        print(f"edge-agent deploy: {e}", file=sys.stderr)
        return 1
    print(f"Installed {report.wheel} on {report.host} in {report.venv}; unit {report.unit}.")
    if args.service_cmds is None:
        print(
            "The edge-agent service is running; follow its log on the device with: "
            "journalctl -u edge-agent -f"
        )
    return 0


def _remote_measure_command(args: argparse.Namespace, *, options: argparse.ArgumentParser) -> int:
    """``remote-measure``; ``options`` parses this command's options found after MODEL."""
    rest = list(args.rest)
    cut = rest.index("--") if "--" in rest else len(rest)
    args, unknown = options.parse_known_args(rest[:cut], namespace=args)
    measure_args = unknown + rest[cut + 1 :]
    try:
        result = remote_measure(
            args.target, args.model, measure_args=measure_args, agent_cmd=args.agent_cmd, **_connect_kw(args)
        )
    except SshError as e:
        print(f"edge-agent remote-measure: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0
