"""edge_agent.ssh, deploy and remote_measure against a real OpenSSH server on 127.0.0.1: host keys,
key auth, deploy, remote-measure and their command line."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import cli, ssh
from edge_agent.deploy import deploy, render_unit
from edge_agent.remote_measure import remote_measure
from edge_agent.ssh import SshError

from servers import sshd_server

pytest.importorskip("paramiko")
pytestmark = pytest.mark.e2e  # a real sshd

BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)  # a venv made from a venv python fails


@pytest.fixture(scope="module")
def remote_tmp(tmp_path_factory) -> Path:
    """The sessions' TMPDIR: where remote_measure's temporary folders go on "the device". One per
    server, so a test that counts them does not see another worker's."""
    return tmp_path_factory.mktemp("remote-tmp")


@pytest.fixture(scope="module")
def server(tmp_path_factory, remote_tmp):
    with sshd_server(tmp_path_factory.mktemp("sshd"), extra=f"SetEnv TMPDIR={remote_tmp}\n") as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_user_ssh_state(monkeypatch, tmp_path):
    """Keep the developer's ssh-agent and ~/.ssh out of the tests."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def connect(server, **kw):
    kw.setdefault("known_hosts", server.known_hosts)
    kw.setdefault("identity", server.client_key)
    return ssh.connect(server.target, **kw)


def openssh_fingerprint(public_line: str, tmp_path: Path) -> str:
    pub = tmp_path / "key.pub"
    pub.write_text(public_line + "\n")
    return subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
    ).stdout.split()[1]


def tiny_onnx(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(3, 3, 3, 3)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def remote_temp_dirs(remote_tmp: Path) -> set[Path]:
    return set(remote_tmp.glob("edge-agent.*"))


# ------------------------------------------------------------------------------------------------
# targets and host keys


@pytest.mark.parametrize(
    "target, expected",
    [
        ("nvidia@jetson.local", ("nvidia", "jetson.local", None)),
        ("nvidia@10.0.0.7:2222", ("nvidia", "10.0.0.7", 2222)),
        ("me@[fe80::1]:22", ("me", "fe80::1", 22)),
        ("me@fe80::1", ("me", "fe80::1", None)),
    ],
)
def test_parse_target(target, expected):
    assert ssh.parse_target(target) == expected


@pytest.mark.parametrize("target", ["jetson.local", "@host", "me@", "me@host:0", "me@host:ssh", "me@[::1"])
def test_parse_target_refuses(target):
    with pytest.raises(SshError, match="user@host|port|IPv6"):
        ssh.parse_target(target)


def test_connect_with_known_host_runs_commands(server):
    client = connect(server)
    try:
        out, err = ssh.run_remote(client, 'echo out; echo err >&2; printf %s "$HOME"', timeout_s=30)
    finally:
        client.close()
    assert out.splitlines()[0] == "out" and out.splitlines()[1].startswith("/")
    assert err == "err\n"


def test_unknown_host_key_is_refused(server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(SshError) as info:
        connect(server, known_hosts=empty)
    message = str(info.value)
    assert f"{server.user}@127.0.0.1:{server.port}" in message
    assert "ssh-keyscan" in message and "--accept-new-host-key" in message
    assert openssh_fingerprint(server.host_key_pub, tmp_path) in message
    assert empty.read_text() == ""


def test_accept_new_host_key_adds_it_and_warns(server, tmp_path, caplog):
    known = tmp_path / "known_hosts"
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    known.write_text(f"# my hosts\nexample.org {other}")  # no final newline: the added line must not join it
    with caplog.at_level(logging.WARNING, logger="edge_agent.ssh"):
        connect(server, known_hosts=known, accept_new_host_key=True).close()
    lines = known.read_text().splitlines()
    assert lines[0] == "# my hosts" and lines[1].startswith("example.org ")  # the rest is left alone
    assert lines[2] == f"[127.0.0.1]:{server.port} {server.host_key_pub}"
    assert openssh_fingerprint(server.host_key_pub, tmp_path) in caplog.text
    connect(server, known_hosts=known).close()  # now known: no flag needed


def test_default_known_hosts_is_the_users(server, tmp_path):
    """Without --known-hosts, ~/.ssh/known_hosts is read and accept-new writes there."""
    user_file = tmp_path / "home" / ".ssh" / "known_hosts"
    with pytest.raises(SshError, match="not in"):
        ssh.connect(server.target, identity=server.client_key)
    ssh.connect(server.target, identity=server.client_key, accept_new_host_key=True).close()
    assert user_file.read_text().strip() == f"[127.0.0.1]:{server.port} {server.host_key_pub}"
    assert stat.S_IMODE(user_file.stat().st_mode) == 0o600
    ssh.connect(server.target, identity=server.client_key).close()


def test_changed_host_key_is_refused_even_with_accept_new(server, tmp_path):
    other_key = (server.client_key.parent / "client_ed25519.pub").read_text().split()[1]  # also ed25519
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} ssh-ed25519 {other_key}\n")
    before = known.read_text()
    with pytest.raises(SshError, match="CHANGED") as info:
        connect(server, known_hosts=known, accept_new_host_key=True)
    assert "127.0.0.1" in str(info.value) and "ssh-keygen -R" in str(info.value)
    assert known.read_text() == before


def test_wrong_client_key_is_an_auth_error(server, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(SshError, match="authentication to .*127.0.0.1.* failed") as info:
        connect(server, identity=stranger)
    assert "ssh-copy-id" in str(info.value) and "--identity" in str(info.value)
    with pytest.raises(SshError, match="does not exist"):
        connect(server, identity=tmp_path / "missing")


def test_unreachable_port_names_the_host(server, tmp_path):
    from servers import free_port

    port = free_port()
    with pytest.raises(SshError, match=f"Could not reach {server.user}@127.0.0.1:{port}"):
        ssh.connect(
            f"{server.user}@127.0.0.1:{port}", identity=server.client_key, known_hosts=server.known_hosts
        )


def test_failing_remote_command_surfaces_its_stderr(server):
    client = connect(server)
    try:
        with pytest.raises(SshError) as info:
            ssh.run_remote(client, "echo first >&2; echo 'disk full' >&2; exit 3", timeout_s=30)
        with pytest.raises(SshError, match="did not finish within 0.5 s"):
            ssh.run_remote(client, "sleep 5", timeout_s=0.5)
    finally:
        client.close()
    message = str(info.value)
    assert "status 3" in message and "disk full" in message and f"127.0.0.1:{server.port}" in message


def test_large_output_on_both_streams_does_not_block(server):
    client = connect(server)
    try:
        script = "import sys\nfor i in range(20000): print(i); print(i, file=sys.stderr)"
        out, err = ssh.run_remote(client, f"{BASE_PYTHON} -c {shlex.quote(script)}", timeout_s=60)
    finally:
        client.close()
    assert out.split() == err.split() == [str(i) for i in range(20000)]


# ------------------------------------------------------------------------------------------------
# the unit (the wheel: test_edge_wheel.py)


def test_render_unit_quotes_for_systemd():
    unit = render_unit(
        venv="/home/nvidia/edge-agent/venv",
        user="nvidia",
        workdir="/home/nvidia/edge-agent",
        agent_args=[
            "--tracking-uri",
            "http://mlflow:5000/a%20b",
            "--device",
            "orin nano",
            "--x",
            'say "$HOME"',
        ],
    )
    execs = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert execs == [
        "ExecStart=/home/nvidia/edge-agent/venv/bin/edge-agent run "
        '--tracking-uri "http://mlflow:5000/a%%20b" --device "orin nano" --x "say \\"$$HOME\\""'
    ]
    for line in (
        "User=nvidia",
        "WorkingDirectory=/home/nvidia/edge-agent",
        "EnvironmentFile=-/home/nvidia/edge-agent/agent.env",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=60",
        "StandardOutput=journal",
    ):
        assert line in unit.splitlines()
    assert "$" not in unit.replace("$$", "")  # every placeholder filled
    with pytest.raises(SshError, match="control character"):
        render_unit(venv="/v", user="u", workdir="/w", agent_args=["a\nExecStartPre=/bin/sh"])


def test_deploy_refuses_credentials_in_the_uri():
    with pytest.raises(SshError, match="agent.env"):
        deploy("me@host", tracking_uri="https://me:hunter2@mlflow.lan", device="orin-nano")


# ------------------------------------------------------------------------------------------------
# deploy and remote-measure, end to end


def test_deploy_installs_the_agent_and_renders_the_unit(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret-token-value")
    remote_dir = tmp_path / "device" / "edge-agent"
    kw = dict(
        tracking_uri="http://mlflow.lan:5000",
        device="orin-nano",
        remote_dir=str(remote_dir),
        python=BASE_PYTHON,
        pip_args=("--no-deps", "--no-index"),
        agent_args=("--poll-s", "5"),
        identity=server.client_key,
        known_hosts=server.known_hosts,
    )
    service_cmds = [
        "test -x $venv/bin/edge-agent",
        "$venv/bin/python -c 'import edge_agent.contract' && touch $remote_dir/started",
    ]
    report = deploy(server.target, service_cmds=service_cmds, **kw)

    venv = remote_dir / "venv"
    assert report.host == f"{server.user}@127.0.0.1:{server.port}"
    assert (report.venv, report.unit) == (str(venv), str(remote_dir / "edge-agent.service"))
    assert (remote_dir / report.wheel).is_file() and (remote_dir / "started").is_file()
    assert any("pip" in c and "install" in c and report.wheel in c for c in report.commands)
    assert report.commands[-1].endswith(f"touch {remote_dir}/started")
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import edge_agent.contract as c; print(c.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert installed.startswith(str(venv)), installed  # the venv's own copy, not this checkout
    unit = Path(report.unit).read_text()
    args = "--tracking-uri http://mlflow.lan:5000 --device orin-nano --poll-s 5"
    assert f"ExecStart={venv}/bin/edge-agent run {args}" in unit.splitlines()
    assert f"User={server.user}" in unit.splitlines()
    assert "s3cret-token-value" not in unit + " ".join(report.commands)
    env_file = remote_dir / "agent.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600

    # a redeploy keeps the venv and agent.env; a failing service command shows its stderr
    env_file.write_text("MLFLOW_TRACKING_TOKEN=kept\n")
    venv_python = (venv / "bin" / "python").stat().st_ino
    with pytest.raises(SshError) as info:
        deploy(server.target, service_cmds=["echo 'systemctl: not here' >&2; exit 4"], **kw)
    message = str(info.value)
    assert (
        "status 4" in message
        and "systemctl: not here" in message
        and "set the service up yourself" in message
    )
    assert env_file.read_text() == "MLFLOW_TRACKING_TOKEN=kept\n"
    assert (venv / "bin" / "python").stat().st_ino == venv_python


def test_remote_measure_round_trip(server, remote_tmp, tmp_path):
    model = tiny_onnx(tmp_path / "tiny.onnx")
    before = remote_temp_dirs(remote_tmp)
    result = remote_measure(
        server.target,
        model,
        measure_args=["--backend", "onnxruntime", "--power", "none", "--warmup-s", "0.2", "--idle-s", "0"]
        + ["--duration-s", "0.5", "--windows", "1", "--state-dir", str(tmp_path / "state")],
        agent_cmd=f"{sys.executable} -m edge_agent",
        identity=server.client_key,
        known_hosts=server.known_hosts,
    )
    assert result["latency_ms_p50"] > 0 and result["latency_ms_p99"] >= result["latency_ms_p50"]
    assert remote_temp_dirs(remote_tmp) == before


def test_remote_measure_rejects_output_that_is_not_json(server, remote_tmp, tmp_path):
    model = tiny_onnx(tmp_path / "tiny.onnx")
    before = remote_temp_dirs(remote_tmp)
    with pytest.raises(
        SshError, match=f"did not print a JSON object; its output began: 'measure {remote_tmp}/edge-agent"
    ):
        remote_measure(
            server.target, model, agent_cmd="echo", identity=server.client_key, known_hosts=server.known_hosts
        )
    assert remote_temp_dirs(remote_tmp) == before


# ------------------------------------------------------------------------------------------------
# command line


def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def test_deploy_options_parse():
    args = parser().parse_args(
        ["deploy", "nvidia@jetson:2222", "--tracking-uri", "http://m:5000", "--device", "orin-nano"]
        + ["--pip-arg=--no-index", "--pip-arg=--find-links=/w", "--agent-arg=--poll-s", "--agent-arg=60"]
        + ["--service-cmd", "echo $unit", "--known-hosts", "kh", "--accept-new-host-key"]
    )
    assert args.func is cli.cmd_deploy
    assert (args.pip_args, args.agent_args, args.service_cmds) == (
        ["--no-index", "--find-links=/w"],
        ["--poll-s", "60"],
        ["echo $unit"],
    )
    assert (args.known_hosts, args.accept_new_host_key, args.identity, args.port) == (
        Path("kh"),
        True,
        None,
        None,
    )
    defaults = parser().parse_args(["deploy", "u@h", "--tracking-uri", "x", "--device", "d"])
    assert (defaults.remote_dir, defaults.python, defaults.service_cmds) == ("~/edge-agent", "python3", None)


def test_remote_measure_command_passes_arguments_and_prints_json(server, tmp_path, capsys):
    model = tiny_onnx(tmp_path / "tiny.onnx")
    # stands in for the agent: prints what it was given, and the size of the file it received
    fake_agent = (
        f"{BASE_PYTHON} -c 'import json, os, sys; "
        'print(json.dumps({"argv": sys.argv[1:], "size": os.path.getsize(sys.argv[2])}))\''
    )
    argv = ["remote-measure", server.target, str(model), "--agent-cmd", fake_agent]
    argv += ["--identity", str(server.client_key), "--known-hosts", str(server.known_hosts)]
    args = parser().parse_args(argv + ["--", "--duration-s", "1", "--device", "orin nano"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["argv"][0] == "measure" and printed["argv"][1].endswith("/tiny.onnx")
    assert printed["argv"][2:] == ["--duration-s", "1", "--device", "orin nano"]
    assert printed["size"] == model.stat().st_size

    args = parser().parse_args(argv[:3] + ["--agent-cmd", "false"] + argv[5:])
    assert args.func(args) == 1
    assert "remote-measure: `false measure" in capsys.readouterr().err


def test_a_session_the_device_closes_during_remote_measure_is_one_sentence(server, tmp_path, capsys):
    model = tiny_onnx(tmp_path / "tiny.onnx")
    # the device's side of the session goes away mid-measurement: its sshd process is killed
    dying = "kill -9 $PPID; sleep 30; echo"
    argv = ["remote-measure", server.target, str(model), "--agent-cmd", dying]
    argv += ["--identity", str(server.client_key), "--known-hosts", str(server.known_hosts)]
    args = parser().parse_args(argv)
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one sentence
    assert f"{server.target} closed the SSH session running `{dying} measure" in lines[0], err
    assert "before it finished (no exit status); check the device" in lines[0]
