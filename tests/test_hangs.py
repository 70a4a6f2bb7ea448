"""Errors instead of hangs: a tracking server where nothing listens, a trial no Ray node can hold,
unknown names and bad numbers given to search.selection. Each must end in one sentence on stderr,
a non-zero exit and no traceback (edge_agent/preflight.py, search/resources.py)."""

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_agent import contract
from edge_agent.preflight import tracking_server_problem
from search import mlflow_util, resources
from search.selection import main as select_main

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60  # the old behaviour: about 250 s of MLflow retries, then a traceback


def cli(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python search/<script> ARGS``, or ``python -m <module> ARGS`` for a dotted name; MLflow's
    retry settings are left at what the CLI makes them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(key, None)
    run = [str(ROOT / "search" / script)] if script.endswith(".py") else ["-m", script]
    cmd = [sys.executable, *run, *args]
    # own process group, so that a hang (TimeoutExpired: the test fails) also ends Ray's processes
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_one_sentence(proc: subprocess.CompletedProcess, *needles: str, rc: int) -> None:
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------- dead server


@pytest.mark.e2e
@pytest.mark.parametrize(
    "script, args",
    [
        ("run.py", ["--smoke-test", "--storage-dir", "s"]),
        ("search.selection", ["--experiment", "x"]),
        ("trainers.train", ["--role", "student", "--alpha", "0", "--iterations", "1", "--out-dir", "s"]),
    ],
)
def test_a_dead_tracking_server_is_named_at_once(script, args, tmp_path):
    port = free_port()  # closed again: nothing listens there
    proc = cli(script, [*args, "--tracking-uri", f"http://127.0.0.1:{port}"], tmp_path)
    assert_one_sentence(proc, f"127.0.0.1:{port}", "mlflow server", "--tracking-uri", rc=1)
    assert not (tmp_path / "s").exists()  # run.py stopped before any study state was written


def test_the_probe_names_what_it_found():
    assert tracking_server_problem("sqlite:///mlflow.db") is None  # nothing to probe
    assert "invalid port" in tracking_server_problem("http://127.0.0.1:99999")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        problem = tracking_server_problem(f"http://127.0.0.1:{port}", timeout_s=0.5)
        assert problem.startswith(f"no MLflow tracking server answers at 127.0.0.1:{port} (no answer within")
    with socket.socket() as ssh:  # answers, but not in HTTP
        ssh.bind(("127.0.0.1", 0))
        ssh.listen()

        def banner():
            conn, _ = ssh.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            conn.close()

        threading.Thread(target=banner, daemon=True).start()
        problem = tracking_server_problem(f"http://127.0.0.1:{ssh.getsockname()[1]}", timeout_s=5)
        assert "does not speak HTTP" in problem


# ---------------------------------------------------------------------------------- Ray resources


@pytest.mark.ray
@pytest.mark.e2e
def test_a_trial_no_node_can_hold_fails_before_any_trial(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--smoke-test", "--tracking-uri", uri, "--storage-dir", "s", "--experiment", "hang"]
    proc = cli("run.py", [*args, "--gpus-per-trial", "1", "--cpus-per-trial", "64"], tmp_path)
    assert_one_sentence(proc, "64 CPU and 1 GPU", "--gpus-per-trial", "--cpus-per-trial", rc=1)
    # checked before the study starts: no study run, no LATEST for --resume or selection to find
    assert mlflow_util.client(uri).get_experiment_by_name("hang") is None
    assert not (tmp_path / "s" / "LATEST").exists()


NODE = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 4e9}}


def test_fit_problem_names_what_no_node_has():
    gpu_node = {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}
    dead_big = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    assert resources.fit_problem(0.5, 0, [NODE]) is None  # fractions are fine
    assert resources.fit_problem(1, 0.5, [NODE, gpu_node]) is None
    assert resources.fit_problem(2, 0, [NODE]) is None
    problem = resources.fit_problem(1, 1, [NODE, dead_big])
    assert "one trial's 1 GPU (1 alive node, the largest has 2 CPU, 0 GPU)" in problem
    assert "gpus_per_trial (--gpus-per-trial)" in problem and "cpus_per_trial" not in problem
    problem = resources.fit_problem(2, 1, [NODE, gpu_node])  # each fits somewhere, never together
    assert "2 CPU and 1 GPU together" in problem and "cpus_per_trial" in problem


@pytest.fixture
def fake_cluster(monkeypatch):
    """ray.nodes() answers from ``shapes`` (one list of nodes per call, the last repeating);
    autoscaler requests are recorded."""
    import ray
    import ray.autoscaler.sdk

    state = {"shapes": [[NODE]], "calls": 0, "requests": []}

    def nodes():
        state["calls"] += 1
        return state["shapes"][min(state["calls"], len(state["shapes"])) - 1]

    monkeypatch.setattr(ray, "nodes", nodes)
    monkeypatch.setattr(
        ray.autoscaler.sdk, "request_resources", lambda bundles: state["requests"].append(bundles)
    )
    return state


def test_a_cluster_gets_time_for_the_autoscaler(fake_cluster, monkeypatch):
    assert resources.trial_fit_problem(1, 1, local=True) is not None  # a local Ray: no waiting
    assert fake_cluster["requests"] == []

    fake_cluster["calls"] = 0
    fake_cluster["shapes"] = [[NODE], [NODE], [NODE, {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}]]
    monkeypatch.setenv(resources.WAIT_ENV, "30")
    assert resources.trial_fit_problem(1, 1, local=False, poll_s=0.01) is None
    assert fake_cluster["requests"] == [[{"CPU": 1, "GPU": 1}], []]  # asked for a node, then cleared

    fake_cluster["shapes"], fake_cluster["requests"] = [[NODE]], []
    monkeypatch.setenv(resources.WAIT_ENV, "0.05")
    problem = resources.trial_fit_problem(0.5, 1, local=False, poll_s=0.01)
    assert problem.endswith("(waited 0.05 s for the autoscaler)")
    assert fake_cluster["requests"] == [[{"CPU": 0.5, "GPU": 1}], []]

    monkeypatch.setenv(resources.WAIT_ENV, "soon")
    assert resources.WAIT_ENV in resources.trial_fit_problem(1, 1, local=False)


# ---------------------------------------------------------------------------- search.selection


@pytest.mark.e2e
def test_select_names_unknown_experiment_study_and_model(server, mlflow_fail_fast, capsys):
    # in-process (a traceback would be an exception here); the CLI path is the one above
    c = mlflow_util.client(server)
    exp_id = c.create_experiment("hang-select")

    def select(*args: str) -> tuple[int, str]:
        rc = select_main([*args, "--tracking-uri", server])
        return rc, capsys.readouterr().err

    rc, err = select("--experiment", "no-such")
    assert rc == 2 and "there is no experiment 'no-such'" in err
    for bad in ("0" * 32, "not a run id"):
        rc, err = select("--experiment", "hang-select", "--study", bad)
        assert rc == 2 and f"there is no run '{bad}' at {server}; check --study" in err
    c.create_run(exp_id, tags={contract.ROLE: contract.ROLE_STUDY})
    rc, err = select("--experiment", "hang-select", "--model-name", "it's")  # a filter MLflow refuses
    assert rc == 1 and err.startswith(f"error: MLflow at {server} failed the request: ")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max-power-mw", "nan"),
        ("--max-power-mw", "-5"),
        ("--max-latency-ms", "inf"),
        ("--max-latency-ms", "0"),
        ("--min-psnr", "nan"),
        ("--min-psnr", "-inf"),
    ],
)
def test_select_refuses_bad_numbers_naming_the_flag(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse, before any MLflow call
        select_main(["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", flag, value])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()


def _exited(pid: int) -> bool:
    """True once ``pid`` is gone or a zombie nobody reaped (a re-parented child in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.e2e  # the loop's command lines: a search's process and its edge agent
def test_a_searchs_local_agent_exits_when_the_search_is_killed(tmp_path):
    import time

    driver = tmp_path / "driver.py"  # what search/run.py does: start the local agent, then work
    driver.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from search.config import load_config\n"
        "from search.loop import LocalAgent\n"
        "agent = LocalAgent(sys.argv[1], load_config(), Path(sys.argv[2]))\n"
        "print('PID', agent.proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the agent backs off from a server that is not there, and would keep doing so for ever
    proc = subprocess.Popen(
        [sys.executable, str(driver), f"http://127.0.0.1:{free_port()}", str(tmp_path / "agent")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        agent = int(next(line for line in proc.stdout if line.startswith("PID")).split()[1])
        log = tmp_path / "agent" / "agent.log"
        deadline = time.monotonic() + 120
        while "agent started" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and not _exited(agent), log.read_text()
            time.sleep(0.2)
    finally:
        proc.kill()  # the search dies without a word: no finally, no atexit
        proc.wait()
    deadline = time.monotonic() + 30
    while not _exited(agent) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not _exited(agent):
        os.kill(agent, signal.SIGKILL)
        pytest.fail("the local agent outlived the search that started it")
    assert "the process that started this agent exited; stopping" in log.read_text()


def test_a_mistyped_sqlite_path_creates_no_database(tmp_path, capsys):
    """Commands that read what a search wrote name the missing database instead of letting MLflow
    create an empty one there (and then report that nothing is in it)."""
    from edge_agent.cli import main as agent_main
    from search.run import main as search_main
    from trainers.evaluate import main as evaluate_main

    typo = tmp_path / "mlfow.db"
    uri = f"sqlite:///{typo}"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "LATEST").write_text("s1")  # a study to resume, said to be in that database
    commands = {
        "select": lambda: select_main(["--experiment", "x", "--tracking-uri", uri]),
        "edge-agent run": lambda: agent_main(["run", "--once", "--device", "cpu", "--tracking-uri", uri]),
        "evaluate": lambda: evaluate_main(
            ["--model", "models:/m/1", "--data", str(tmp_path), "--tracking-uri", uri]
        ),
        "search --resume": lambda: search_main(
            ["--smoke-test", "--resume", "--tracking-uri", uri, "--storage-dir", str(tmp_path / "s")]
        ),
    }
    for name, command in commands.items():
        assert command() == (2 if name == "search --resume" else 1), name  # 2: a config error there
        err = capsys.readouterr().err
        assert f"error: no MLflow database at {typo} (from the tracking URI {uri}); check the path" in err, (
            name
        )
        assert not typo.exists(), f"{name} created {typo}"
