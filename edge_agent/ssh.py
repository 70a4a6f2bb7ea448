"""SSH to a device: connecting with host-key checking, running commands, copying files (SFTP).

Security by default, like OpenSSH with StrictHostKeyChecking=yes: the device's host key is checked
against /etc/ssh/ssh_known_hosts and ~/.ssh/known_hosts (or one file given with ``known_hosts``);
an unknown key is refused unless ``accept_new_host_key`` (OpenSSH's ``accept-new``: the key is
added to the file and a warning names its fingerprint), and a changed key is always refused. Only
key authentication (ssh-agent, ~/.ssh/id_*, or ``identity``): no password is asked for, taken or
logged.

What goes over the connection lives beside this module: ``edge_agent.wheel`` builds the device's
wheel, ``edge_agent.deploy`` installs it as a service, ``edge_agent.remote_measure`` measures a
model there; ``edge_agent.cli`` holds their command line. paramiko is imported inside the
functions that need it: the daemon on the device never does.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.errors import UserError

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
USER_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
_STDERR_TAIL_LINES = 15


class SshError(UserError, RuntimeError):
    """A failure reaching, installing on or measuring on a device, worded for the user."""


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


# --------------------------------------------------------------------------------------------------
# running commands


def target_label(client: paramiko.SSHClient) -> str:
    """How errors name the device: ``user@host[:port]`` as connected to, else the peer's address."""
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
    label = target_label(client)
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
                        f"{output_tail(err.decode(errors='replace') or out.decode(errors='replace'))}"
                    )
                time.sleep(0.005)
        status = chan.exit_status if chan.exit_status_ready() else -1
    finally:
        chan.close()
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if status < 0:  # the channel closed without an exit status: the device's end of it went away
        raise SshError(
            f"{label} closed the SSH session running `{command}` before it finished (no exit status); "
            f"check the device (rebooted, out of memory, sshd restarted). {output_tail(stderr or stdout)}"
        )
    if status != 0:
        raise SshError(f"`{command}` on {label} exited with status {status}. {output_tail(stderr or stdout)}")
    return stdout, stderr


def output_tail(text: str) -> str:
    """The last lines of a command's output, for an error message."""
    lines = text.strip().splitlines()[-_STDERR_TAIL_LINES:]
    return ("Its last output:\n  " + "\n  ".join(lines)) if lines else "It printed nothing."


# --------------------------------------------------------------------------------------------------
# copying files


def open_sftp(client: paramiko.SSHClient, label: str) -> paramiko.SFTPClient:
    """An SFTP session on ``client``; ``label`` names the device in the error."""
    try:
        return client.open_sftp()
    except Exception as e:  # paramiko.SSHException when the server has no sftp subsystem
        raise SshError(
            f"Could not open SFTP on {label}: {e}. The device's sshd needs a `Subsystem sftp` line in "
            "sshd_config."
        ) from e


def put_file(sftp: paramiko.SFTPClient, label: str, local: Path, remote: str) -> None:
    """Copy the local file ``local`` to ``remote`` on the device."""
    try:
        sftp.put(str(local), remote)
    except OSError as e:
        raise SshError(f"Copying {local} to {label}:{remote} failed: {e}") from e


def put_text(sftp: paramiko.SFTPClient, label: str, text: str, remote: str) -> None:
    """Write ``text`` to the file ``remote`` on the device."""
    try:
        with sftp.open(remote, "w") as f:
            f.write(text)
    except OSError as e:
        raise SshError(f"Writing {label}:{remote} failed: {e}") from e
