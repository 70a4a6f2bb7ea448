"""`ray up` for real: the shipped ray_cluster.local.yaml brought up over SSH on two node addresses of
this machine (head 127.0.0.2, worker 127.0.0.3: Ray turns a node address of 127.0.0.1 into the
machine's own address, which the launcher does not know the node by) served by a real sshd with key
authentication and verified host keys; a smoke search run on the head with the file's own command;
its results read from the "workstation" through an SSH tunnel; `ray down`, after which nothing of
the cluster runs. The cluster uses Ray token authentication: the head's start-head made the token
(owner-only, printed nowhere) and a driver without it is refused by the head; the head's MLflow
server runs MLflow's basic-auth app with credentials start-head made (refused without them).

Only what a user changes is substituted in the file: the addresses, the user, the key, the SSH port
and where the known hosts are. The sshd gives the sessions a home of their own (SetEnv HOME), so the
nodes' ~/venv, ~/mambalitesr and ~/mlflow live in a temporary folder, not in this user's home; that
home holds what a user's nodes have of their own: the head's known hosts and ssh config (the port),
and this machine's pip configuration and index (TORCH_INDEX_URL).

The nodes' `ray stop` (in start-head and `ray down`) stops every Ray of the user that it sees, and
a local `ray.init()` joins a `ray start` cluster it finds in Ray's temp folder. Where the machine
allows it, the sshd and so the nodes run in a PID namespace of their own and with a Ray temp folder
of their own (RAY_TMPDIR): the test then runs beside the suite's other Rays. Elsewhere it runs
alone (tests/conftest.py).
"""

import configparser
import getpass
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from edge_agent import contract

from servers import free_port, pid_namespaces, sshd_server

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.ray]
RAY = Path(sys.executable).with_name("ray")
NODES = ("127.0.0.2", "127.0.0.3")  # head, worker


def user_env(extra_env=None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # as a user's shell has it
    env.update(extra_env or {})
    return env


def run(cmd, timeout=900, extra_env=None, **kw):
    print()
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=user_env(extra_env), **kw
    )


def start(cmd, extra_env=None) -> subprocess.Popen:
    """``cmd`` in the background, its output kept for ``communicate``."""
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=user_env(extra_env)
    )


# a driver joining the head (run with the nodes' Python, outside their home: without their token)
JOIN = ["-c", f"import ray; ray.init(address='{NODES[0]}:6379', logging_level='ERROR'); print('JOINED')"]


@pytest.fixture
def nodes(tmp_path):
    """An sshd on 127.0.0.2 and 127.0.0.3 (one port), key auth only, the sessions' HOME in tmp_path."""
    if shutil.which("rsync") is None:
        pytest.fail("rsync is needed (Ray's file mounts): bash scripts/test_deps.sh installs it")
    home = tmp_path / "home"
    home.mkdir()
    # the nodes' own pip configuration is this machine's (where a CPU build of torch may lie locally)
    for conf in (Path.home() / ".config" / "pip" / "pip.conf", Path.home() / ".pip" / "pip.conf"):
        if conf.is_file():
            (home / conf.relative_to(Path.home())).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(conf, home / conf.relative_to(Path.home()))
    # torch from the index this machine's pip uses (with its configuration above), as a CPU node
    # without access to PyTorch's own index is set up (cluster_node.sh): a machine that reaches only
    # the package registries spends minutes in pip's retries of download.pytorch.org otherwise
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    # a short path: Ray's Unix sockets live under its temp folder (about 107 characters at most)
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    env = f"HOME={home} TORCH_INDEX_URL={index} RAY_TMPDIR={ray_tmp}"
    extra = f"SetEnv {env}\nMaxStartups 100\nMaxSessions 100\n"
    own_pids = pid_namespaces()
    with sshd_server(tmp_path / "sshd", addresses=NODES, extra=extra, own_pids=own_pids) as server:
        # the head's own: it starts the worker over SSH and checks its key (scripts/verified_ssh/ssh)
        (home / ".ssh").mkdir(mode=0o700)
        shutil.copy(server.known_hosts, home / ".ssh" / "known_hosts")
        (home / ".ssh" / "config").write_text(f"Host {' '.join(NODES)}\n  Port {server.port}\n")
        try:
            yield {
                "port": server.port,
                "key": server.client_key,
                "known_hosts": server.known_hosts,
                "home": home,
                "tmp": tmp_path,
            }
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def cluster_file(nodes) -> Path:
    """ray_cluster.local.yaml with this machine's addresses, user, key, port and known hosts."""
    text = (ROOT / "ray_cluster.local.yaml").read_text()
    port, key, user = nodes["port"], str(nodes["key"]), getpass.getuser()
    for old, new in (
        ("-p 22 -W %h:22", f"-p {port} -W %h:{port}"),
        ("UserKnownHostsFile=~/.ssh/known_hosts", f"UserKnownHostsFile={nodes['known_hosts']}"),
        ("~/.ssh/id_ed25519", key),
        ("ubuntu", user),
        ("192.0.2.10", NODES[0]),
        ("[192.0.2.11, 192.0.2.12]", f"[{NODES[1]}]"),
    ):
        assert old in text, f"ray_cluster.local.yaml no longer has {old!r}"
        text = text.replace(old, new)
    cfg = yaml.safe_load(text)
    assert cfg["provider"]["head_ip"] == NODES[0] and cfg["auth"]["ssh_user"] == user
    path = nodes["tmp"] / "cluster.yaml"
    path.write_text(text)
    return path


def processes_of(home: Path) -> list[int]:
    """Pids of processes whose command line or environment points into the nodes' home."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(home).encode() in blob:
            found.append(int(entry.name))
    return found


def test_ray_up_runs_a_search_on_two_nodes_and_ray_down_leaves_nothing(nodes, monkeypatch):
    from mlflow.tracking import MlflowClient

    path = cluster_file(nodes)
    home = nodes["home"]
    tunnel = refused = joined = None
    try:
        up = run([str(RAY), "up", "-y", "--no-config-cache", str(path)], timeout=1500)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        assert (home / "venv" / "bin" / "ray").exists() and (home / "mambalitesr" / "search").is_dir()
        # the head's autoscaler starts the worker over SSH; wait for two live nodes
        count = (
            "import ray; ray.init(address='auto', logging_level='ERROR'); "
            "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline, alive = time.monotonic() + 600, ""
        while time.monotonic() < deadline:
            out = run([str(RAY), "exec", str(path), f'~/venv/bin/python -c "{count}"'], timeout=120)
            alive = [line for line in out.stdout.splitlines() if line.startswith("ALIVE")]
            if alive and alive[-1] == "ALIVE 2":
                break
            time.sleep(3)
        assert alive and alive[-1] == "ALIVE 2", out.stdout[-3000:] + out.stderr[-3000:]

        # token authentication: a driver without the token (auth off on its side, no token file in
        # its home) must be refused, one with it let in. Ray retries the refused one for about 20 s:
        # both run while the search does
        token_file = home / ".ray" / "auth_token"
        python = str(home / "venv" / "bin" / "python")
        refused = start([python, *JOIN], extra_env={"RAY_AUTH_MODE": "disabled"})
        joined = start(
            [python, *JOIN], extra_env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        )
        # the search as a user runs it on a cluster whose device is elsewhere (no local agent)
        search = run(
            [
                str(RAY),
                "exec",
                str(path),
                "bash ~/mambalitesr/scripts/head_search.sh --smoke-test --no-local-agent --no-select",
            ],
            timeout=1200,
        )
        assert search.returncode == 0, search.stdout[-4000:] + search.stderr[-4000:]

        # the head made the token (owner-only), nothing printed it, and the head refused a process
        # without it
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        # the MLflow server's credentials, likewise: made by start-head, owner-only, printed nowhere
        credentials = configparser.ConfigParser()
        credentials.read(home / ".mlflow" / "credentials")
        assert (home / ".mlflow" / "credentials").stat().st_mode & 0o777 == 0o600
        user = credentials["mlflow"]["mlflow_tracking_username"]
        password = credentials["mlflow"]["mlflow_tracking_password"]
        assert len(password) >= 32
        for out in (up, search):
            for secret in (token, password):
                assert secret not in out.stdout + out.stderr
        out, err = refused.communicate(timeout=120)
        assert refused.returncode != 0 and "JOINED" not in out, out[-2000:]
        assert "Authentication token is missing or incorrect" in err, err[-2000:]
        out, err = joined.communicate(timeout=120)
        assert "JOINED" in out, out[-2000:] + err[-2000:]

        # the workstation's view: the head's MLflow through an SSH tunnel, as the file's header says
        local = free_port()
        proxy = yaml.safe_load(path.read_text())["auth"]["ssh_proxy_command"]
        tunnel = subprocess.Popen(
            ["ssh", "-N", "-L", f"{local}:{NODES[0]}:5000", "-i", str(nodes["key"]), "-o", "BatchMode=yes"]
            + ["-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=yes"]
            + [
                "-o",
                f"UserKnownHostsFile={nodes['known_hosts']}",
                "-o",
                f"HostKeyAlias=[{NODES[0]}]:{nodes['port']}",
            ]
            + [f"{getpass.getuser()}@{NODES[0]}"]
        )
        url = f"http://127.0.0.1:{local}/api/2.0/mlflow/experiments/search?max_results=1"
        for _ in range(60):
            try:
                urllib.request.urlopen(url, timeout=10)
                pytest.fail("the cluster's MLflow server answered a request without credentials")
            except urllib.error.HTTPError as exc:
                assert exc.code == 401, exc  # refused: authentication required
                break
            except OSError:  # the tunnel is not up yet
                time.sleep(0.5)
        # the workstation with the credentials copied from the head (what README says to do)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(f"http://127.0.0.1:{local}")
        exp = client.get_experiment_by_name("mambalitesr-smoke")
        assert exp is not None
        trials = client.search_runs([exp.experiment_id], f"tags.`{contract.ROLE}` = '{contract.ROLE_TRIAL}'")
        assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
        assert len({t.data.tags["ray.node_id"] for t in trials}) == 2  # trials ran on both nodes
        assert client.search_model_versions(f"name='{contract.REGISTERED_MODEL}'")
    finally:
        for proc in (refused, joined):
            if proc is not None and proc.poll() is None:
                proc.kill()
        if tunnel is not None:
            tunnel.send_signal(signal.SIGTERM)
            tunnel.wait(timeout=10)
        down = run([str(RAY), "down", "-y", str(path)], timeout=300)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    deadline = time.monotonic() + 120  # a worker's raylet exits once the head's GCS is gone
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(2)
    left = processes_of(home)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], [
        Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left if Path(f"/proc/{p}").exists()
    ]
