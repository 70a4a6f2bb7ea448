"""Real servers for end-to-end tests on 127.0.0.1: an MLflow tracking server, an OpenSSH server."""

from __future__ import annotations

import functools
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(ready, proc: subprocess.Popen, timeout_s: float, error: str, interval_s: float) -> None:
    """Poll ``ready()`` until it is true; raise ``error`` if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(error)
        time.sleep(interval_s)


def _health_ok(uri: str):
    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    return ready


def _port_open(port: int, host: str = "127.0.0.1"):
    def ready() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    return ready


@contextmanager
def mlflow_server(root: Path, timeout_s: float = 120.0, port: int | None = None):
    """``mlflow server`` with a SQLite backend and served artifacts; yields its URI.

    Starting it again with the same ``root`` and ``port`` brings back the same server (a restart).
    """
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "wb")
    # without MLflow's job runner (seven more processes, 25 CPU-seconds per start), as the
    # project's own server script starts it; own process group: stopping it stops its children
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(
            _health_ok(uri), proc, timeout_s, f"mlflow server did not start; see {root / 'server.log'}", 0.5
        )
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)  # SQLite keeps what was committed: a slow stop is killed
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


SSHD = Path("/usr/sbin/sshd")


@dataclass(frozen=True)
class SshServer:
    host: str
    port: int
    user: str  # this process's user: the server lets it in with client_key
    client_key: Path  # private key (ed25519, no passphrase) in the server's authorized_keys
    known_hosts: Path  # one line: the server's host key, as `[127.0.0.1]:PORT ssh-ed25519 ...`
    host_key_pub: str  # "ssh-ed25519 AAAA..." of the server

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@functools.cache
def pid_namespaces() -> bool:
    """Whether this machine lets the tests start a process in a PID namespace of its own
    (``unshare --pid``: root, or user namespaces allowed)."""
    if shutil.which("unshare") is None:
        return False
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "true"]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


@contextmanager
def sshd_server(
    root: Path,
    timeout_s: float = 20.0,
    addresses: tuple[str, ...] = ("127.0.0.1",),
    extra: str = "",
    own_pids: bool = False,
):
    """A real OpenSSH server on ``addresses`` (one port) with fresh keys, key authentication only;
    ``extra``: more sshd_config lines. Yields SshServer (``host``: the first address).

    ``own_pids``: the server and every session run in a PID namespace of their own (needs
    ``pid_namespaces()``): what they run sees, and can stop, only their own processes (a node's
    ``ray stop`` leaves the tests' other Rays alone), and all of it ends with the server."""
    if not SSHD.is_file() or shutil.which("ssh-keygen") is None:
        pytest.skip(f"{SSHD} or ssh-keygen not found: apt-get install openssh-server (CI installs it)")
    root.mkdir(parents=True, exist_ok=True)
    host_key, client_key = root / "ssh_host_ed25519_key", root / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (root / "authorized_keys").write_text((root / "client_ed25519.pub").read_text())
    host_key_pub = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
    port = free_port()
    known_hosts = root / "known_hosts"
    known_hosts.write_text("".join(f"[{ip}]:{port} {host_key_pub}\n" for ip in addresses))
    config = root / "sshd_config"
    config.write_text(
        "".join(f"ListenAddress {ip}\n" for ip in addresses)
        + f"""Port {port}
HostKey {host_key}
PidFile {root / "sshd.pid"}
AuthorizedKeysFile {root / "authorized_keys"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
LogLevel VERBOSE
{extra}"""
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation dir
    log = open(root / "sshd.log", "wb")
    cmd = [str(SSHD), "-D", "-e", "-f", str(config)]
    if own_pids:
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *cmd]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = _port_open(port, addresses[0])
        _wait_ready(ready, proc, timeout_s, f"sshd did not start; see {root / 'sshd.log'}", 0.1)
        yield SshServer(
            host=addresses[0],
            port=port,
            user=getpass.getuser(),
            client_key=client_key,
            known_hosts=known_hosts,
            host_key_pub=host_key_pub,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
