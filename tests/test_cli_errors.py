"""User errors are one sentence and a non-zero exit, never a traceback.

Bad flags and values stop argparse with exit 2 before any work; bad files, URIs and unreachable
servers exit 1 (``edge-agent measure`` keeps 2 for a model path that is not a file). Covers the
edge agent's commands, ``python -m trainers.evaluate`` and ``python -m model.export``. ONNX graphs
are built with onnx's helper API, small enough to load in milliseconds; one real MLflow server
serves the whole module.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent import backends, cli, contract
from edge_agent.agent import Agent, AgentConfig
from edge_agent.fileio import sha256_file
from edge_agent.measure import MeasureConfig
from edge_agent.mlflow_io import Registry, RegistryError
from edge_agent.outbox import Outbox
from model import export
from trainers import evaluate

from conftest import write_png
from servers import free_port

DEVICE = "orin-nano"
TILE = 8  # the test graphs take (1, 3, 8, 8) and return (1, 3, 16, 16): a x2 SR model


def sr_graph(
    path: Path, in_type: int = TensorProto.FLOAT, in_shape: tuple[int, ...] = (1, 3, TILE, TILE)
) -> Path:
    """A x2 "SR model" (3x3 conv to 12 channels, DepthToSpace 2) behind an input of any type and shape.

    A non-float input is cast and a flat one reshaped first, so the graph itself is valid and runs:
    only its signature is wrong.
    """
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((12, 3, 3, 3)).astype(np.float32) * 0.1, "w")]
    nodes, x = [], "x"
    if in_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    if tuple(in_shape) != (1, 3, TILE, TILE):
        weights.append(numpy_helper.from_array(np.array([1, 3, TILE, TILE], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", [x, "shape"], ["x4"]))
        x = "x4"
    nodes += [
        helper.make_node("Conv", [x, "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("DepthToSpace", ["c"], ["y"], blocksize=2),
    ]
    graph = helper.make_graph(
        nodes,
        "sr",
        [helper.make_tensor_value_info("x", in_type, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2 * TILE, 2 * TILE])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what this onnxruntime reads
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


def truncated(path: Path) -> Path:
    whole = sr_graph(path).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    return path


BAD_MODELS = {
    "random-bytes": random_bytes,
    "truncated": truncated,
    "int64-input": lambda p: sr_graph(p, TensorProto.INT64),
    "1d-input": lambda p: sr_graph(p, in_shape=(3 * TILE * TILE,)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    out = {name: make(root / f"{name}.onnx") for name, make in BAD_MODELS.items()}
    out["good"] = sr_graph(root / "good.onnx")
    return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("set") / "Tiny"
    write_png(root / "HR" / "a.png", (np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8))
    return root


@pytest.fixture(autouse=True)
def _keep_global_state(monkeypatch):
    """``cli.main`` points the edge_agent logger at this test's captured stdout, and an MLflow URI
    sets MLFLOW_TRACKING_URI for the process: both are put back afterwards."""
    logger = logging.getLogger("edge_agent")
    handlers, level = logger.handlers[:], logger.level
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")  # recorded, so the delenv below is undone
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    yield
    logger.handlers[:], logger.level = handlers, level
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)


def _usage_error(main, argv: list[str], capsys) -> str:
    """Run a CLI that must stop in argparse: exit 2, no traceback; returns stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- bad flags and values

MEASURE = ["measure", "model.onnx"]
RUN = ["run", "--tracking-uri", "http://127.0.0.1:5000", "--device", DEVICE]
DEPLOY = ["deploy", "u@h", "--tracking-uri", "http://m:5000", "--device", DEVICE]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (MEASURE + ["--duration-s", "0"], "--duration-s"),
        (MEASURE + ["--duration-s", "nan"], "--duration-s"),
        (MEASURE + ["--idle-s", "-1"], "--idle-s"),
        (MEASURE + ["--warmup-s", "inf"], "--warmup-s"),
        (MEASURE + ["--rate-hz", "0"], "--rate-hz"),
        (MEASURE + ["--windows", "0"], "--windows"),
        (MEASURE + ["--pause-s", "-1"], "--pause-s"),
        (MEASURE + ["--max-cv", "0"], "--max-cv"),
        (MEASURE + ["--rate-hz=-inf"], "--rate-hz"),
        (MEASURE + ["--state-dir", "/proc/edge-agent-test"], "--state-dir"),
        (RUN + ["--poll-s", "0"], "--poll-s"),
        (RUN + ["--takeover-s", "-5"], "--takeover-s"),
        (RUN + ["--idle-s", "nan"], "--idle-s"),
        (["run", "--tracking-uri", "http://127.0.0.1:5000", "--device", "orin nano"], "--device"),
        (DEPLOY + ["--port", "0"], "--port"),
        (DEPLOY + ["--port", "70000"], "--port"),
        (DEPLOY[:-1] + ["orin/nano"], "--device"),
        (["remote-measure", "u@h", "m.onnx", "--port", "-22"], "--port"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_edge_agent_refuses_bad_values_before_any_work(argv, flag, capsys):
    assert f"argument {flag}" in _usage_error(cli.main, argv, capsys)


EVAL = ["--model", "bicubic", "--data", "Set5"]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (EVAL + ["--scale", "5"], "--scale"),
        (EVAL + ["--device", "tpu"], "--device"),
        (EVAL + ["--device", "cuda:9"], "--device"),  # no CUDA here, or not nine GPUs
        (EVAL + ["--json", "/proc/evaluate-test.json"], "--json"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_evaluate_refuses_bad_values_before_any_work(argv, flag, capsys):
    err = _usage_error(evaluate.main, argv, capsys)
    assert f"argument {flag}" in err
    if flag == "--device":
        assert "cpu" in err and "cuda" in err  # says what to use instead


OUT = ["--preset", "tiny", "--out"]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (OUT + ["x.onnx", "--json", "/proc/export-test.json"], "--json"),
        (OUT + ["x.onnx", "--height", "0"], "--height"),
        (OUT + ["x.onnx", "--width", "-16"], "--width"),
        (OUT + ["x.onnx", "--opset", "12"], "--opset"),
        (OUT + ["x.onnx", "--opset", "99"], "--opset"),
        (OUT + ["x.onnx", "--n-checks", "0"], "--n-checks"),
        (OUT + ["x.onnx", "--tolerance", "nan"], "--tolerance"),
        (OUT + ["x.onnx", "--tolerance", "0"], "--tolerance"),
        (OUT + ["x.onnx", "--seed", "-1"], "--seed"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_export_refuses_bad_values_before_tracing(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert f"argument {flag}" in _usage_error(export.main, argv, capsys)
    assert not list(tmp_path.iterdir())  # nothing written, no x.onnx.partial


@pytest.mark.parametrize("where", ["proc", "directory"])
def test_export_to_an_unwritable_out_fails_before_tracing(where, tmp_path, capsys, monkeypatch):
    """Exit 1, as when the write itself fails (tests/test_export.py), but before any work."""
    out = Path("/proc/export-test.onnx") if where == "proc" else tmp_path / "taken.onnx"
    if where == "directory":
        out.mkdir()

    def must_not_run(*args, **kwargs):
        raise AssertionError("export_onnx ran: the destination was not checked first")

    monkeypatch.setattr(export, "export_onnx", must_not_run)
    assert export.main(OUT + [str(out)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and "Traceback" not in err
    assert not out.with_name(out.name + ".partial").exists()
    if where == "directory":
        assert not any(out.iterdir()) and sorted(tmp_path.iterdir()) == [out]


# ----------------------------------------------------------------------------- bad ONNX files


QUICK = ["--warmup-s", "0", "--idle-s", "0", "--duration-s", "0.1", "--windows", "1"]  # one short window


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_edge_agent_measure_names_a_bad_model(models, name, tmp_path, capsys):
    argv = ["measure", str(models[name]), "--backend", "onnxruntime", "--power", "none"]
    argv += [*QUICK, "--state-dir", str(tmp_path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert str(models[name]) in err and "python -m model.export" in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_evaluate_names_a_bad_model(models, small_set, name, capsys):
    assert evaluate.main(["--model", str(models[name]), "--data", str(small_set)]) == 1
    err = capsys.readouterr().err
    assert str(models[name]) in err and "python -m model.export" in err and "Traceback" not in err


def test_the_test_graph_is_a_working_x2_model(models, small_set, tmp_path, capsys):
    """The control for the two tests above: the same graph with the right signature runs."""
    assert evaluate.main(["--model", str(models["good"]), "--data", str(small_set)]) == 0
    argv = ["measure", str(models["good"]), "--backend", "onnxruntime", "--power", "none"]
    argv += [*QUICK, "--state-dir", str(tmp_path)]
    assert cli.main(argv) == 0


# ----------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def registered(server, models):
    """One registered model: two bad graphs (one ONNX Runtime cannot load, one it runs but with the
    wrong signature; the others take the same path) and the good one, last."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server)
    exp = client.create_experiment("cli-errors")
    name, versions = "m-cli-errors", {}
    client.create_registered_model(name)
    for key in ("random-bytes", "1d-input", "good"):
        run = client.create_run(exp)
        folder = models[key].parent / key
        folder.mkdir()
        (folder / contract.ONNX_FILE).write_bytes(models[key].read_bytes())
        client.log_artifact(run.info.run_id, str(folder / contract.ONNX_FILE), contract.ONNX_ARTIFACT_DIR)
        v = client.create_model_version(
            name,
            source=f"runs:/{run.info.run_id}/{contract.ONNX_ARTIFACT_DIR}",
            run_id=run.info.run_id,
            tags={contract.TAG_SHA256: sha256_file(models[key])},
        )
        versions[key] = v.version
    return name, versions


def _agent(server: str, tmp: Path, model_name: str) -> Agent:
    cfg = AgentConfig(
        tracking_uri=server,
        device=DEVICE,
        model_name=model_name,
        state_dir=tmp / "state",
        claim_settle_s=0.05,
        backend="onnxruntime",
        power="none",
        power_root=tmp / "no-sensor",
        measure=MeasureConfig(warmup_s=0.0, idle_s=0.05, duration_s=0.2),
    )
    return Agent(cfg)


@pytest.mark.e2e
@pytest.mark.usefixtures("mlflow_fail_fast")
def test_the_daemon_reports_each_bad_model_as_failed_and_measures_the_rest(server, registered, tmp_path):
    from mlflow.tracking import MlflowClient

    name, versions = registered
    agent = _agent(server, tmp_path, name)
    assert sorted(agent.poll_once()) == sorted(versions.values())  # one pass, nothing raised
    client = MlflowClient(server)
    for key, version in versions.items():
        tags = client.get_model_version(name, version).tags
        status = tags[contract.status_tag(DEVICE)]
        if key == "good":
            assert status == contract.DONE, tags
            continue
        error = tags[contract.error_tag(DEVICE)]
        assert status == contract.FAILED and error.startswith("BackendError"), (key, tags)
        assert "python -m model.export" in error and "Traceback" not in error


@pytest.mark.e2e
@pytest.mark.usefixtures("mlflow_fail_fast")
def test_a_full_disk_under_the_outbox_does_not_stop_the_daemon(server, registered, tmp_path, monkeypatch):
    """The report cannot be kept locally: the pass goes on and the server still gets it."""
    from mlflow.tracking import MlflowClient

    name, versions = registered
    client = MlflowClient(server)
    for version in versions.values():  # measured by the test above (or not): pending again
        client.set_model_version_tag(name, version, contract.status_tag(DEVICE), contract.PENDING)

    def full(self, report):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / f"{report.key}.json"))

    monkeypatch.setattr(Outbox, "put", full)
    agent = _agent(server, tmp_path, name)
    assert sorted(agent.poll_once()) == sorted(versions.values())
    statuses = {
        k: client.get_model_version(name, v).tags[contract.status_tag(DEVICE)] for k, v in versions.items()
    }
    assert statuses == {k: contract.DONE if k == "good" else contract.FAILED for k in versions}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "uri",
    [
        "models:/no-such-model/1",
        "models:/no-such-model@champion",
        "runs:/0123456789abcdef0123456789abcdef/model",
    ],
)
@pytest.mark.usefixtures("mlflow_fail_fast")
def test_evaluate_names_an_unknown_mlflow_uri_and_the_server(server, small_set, uri, capsys):
    assert evaluate.main(["--model", uri, "--data", str(small_set), "--tracking-uri", server]) == 1
    err = capsys.readouterr().err
    assert uri in err and server in err and "not found" in err and "Traceback" not in err


@pytest.mark.usefixtures("mlflow_fail_fast")
def test_evaluate_against_a_dead_server_is_a_sentence(small_set, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    argv = ["--model", "models:/m/1", "--data", str(small_set), "--tracking-uri", dead]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert dead.removeprefix("http://") in err and "Traceback" not in err


def test_edge_agent_run_once_against_a_dead_server_exits_in_seconds(tmp_path, capsys, monkeypatch):
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # the CLI's own defaults
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    port = free_port()
    argv = ["run", "--once", "--tracking-uri", f"http://127.0.0.1:{port}", "--device", DEVICE]
    start = time.monotonic()
    assert cli.main(argv + ["--state-dir", str(tmp_path)]) == 1
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "Traceback" not in err


def test_an_agent_told_to_stop_with_a_process_that_is_not_its_parent_refuses_to_start(tmp_path, capsys):
    argv = ["run", "--tracking-uri", f"http://127.0.0.1:{free_port()}", "--device", DEVICE]
    argv += ["--state-dir", str(tmp_path), "--stop-with-parent", str(os.getpid())]  # our id, not our parent's
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"--stop-with-parent {os.getpid()}: that process is not (or no longer) the one" in err
    assert "Traceback" not in err


def test_an_agent_stops_once_its_parent_is_gone_and_not_before():
    """The watcher behind --stop-with-parent: the parent id it was given is compared with this
    process's parent, which changes when the real parent dies (the agent is re-parented)."""
    import threading

    class Stoppable:
        def __init__(self):
            self.stopped = threading.Event()

        @property
        def stopping(self):
            return self.stopped.is_set()

        def request_stop(self):
            self.stopped.set()

    alive = Stoppable()
    cli._stop_when_orphaned(alive, os.getppid(), period_s=0.01)
    assert not alive.stopped.wait(0.2)  # the parent is still there
    alive.request_stop()  # ends its watcher
    orphaned = Stoppable()
    cli._stop_when_orphaned(orphaned, os.getppid() + 1, period_s=0.01)  # as if re-parented
    assert orphaned.stopped.wait(5)


@pytest.mark.usefixtures("mlflow_fail_fast")
def test_a_registry_call_to_a_dead_server_is_a_registry_error():
    """What the daemon logs, and what ``run --once`` prints, when the server dies mid-pass."""
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError, match="could not reach the MLflow server") as exc:
        Registry(dead, "m").versions()
    assert dead in str(exc.value) and "Connection refused" in str(exc.value)


# ----------------------------------------------------------------------------- engine cache


def test_an_unwritable_engine_cache_is_a_sentence(models, caplog):
    with pytest.raises(backends.BackendError, match="cannot create the engine cache folder /proc/"):
        backends.run_trtexec(
            models["good"],
            "0" * 64,
            "fp32",
            Path("/proc/edge-agent-test"),
            1.0,
            0.0,
            exe="trtexec",
            runner=lambda cmd: subprocess.CompletedProcess(cmd, 0, "", ""),
        )
    with caplog.at_level(logging.WARNING, logger="edge_agent.backends"):
        backends._save_cache(Path("/proc/edge-agent-test/x.engine"), b"plan")  # a warning, not an error
    assert "could not write the cache file /proc/edge-agent-test/x.engine" in caplog.text


def test_every_error_class_of_the_project_is_a_user_error_with_one_exit_code():
    """Each exception class the project defines derives from edge_agent.errors.UserError (usage
    errors, exit 2, from UsageError), so one mapping gives every command line its exit code; found
    by reading the source, so a new class that forgets the base fails here."""
    import ast

    from edge_agent import errors

    builtin = {"Exception", "ValueError", "RuntimeError", "OSError", "FileNotFoundError", "KeyError"}
    ours = {"UserError", "UsageError"}
    classes = {}
    for path in sorted((Path(__file__).parent.parent).glob("*/*.py")):
        if path.parts[-2] in ("model", "trainers", "search", "edge_agent", "benchmarks"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = (
                        [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases],
                        path,
                    )
    found = {n for n, (bases, _) in classes.items() if set(bases) & (builtin | ours)}
    while True:  # and the classes derived from those
        more = {n for n, (bases, _) in classes.items() if set(bases) & found} - found
        if not more:
            break
        found |= more
    errors_found = {n: classes[n] for n in found}

    def derives(name: str) -> bool:
        bases = classes[name][0] if name in classes else []
        return bool(set(bases) & ours) or any(b in classes and b != name and derives(b) for b in bases)

    assert len(errors_found) >= 20, sorted(errors_found)
    assert [n for n in errors_found if n not in ours and not derives(n)] == [], "missing the base"

    class Broken(errors.UsageError):
        pass

    assert errors.fail(Broken("x")) == errors.USAGE and errors.fail(errors.UserError("y")) == errors.FAILED
    assert errors.fail(ValueError("z")) == errors.FAILED and errors.fail(ValueError("z"), code=2) == 2
