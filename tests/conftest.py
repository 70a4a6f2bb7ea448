"""Shared test helpers: where ../shared lives, small image folders, one trace per exported network."""

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton reads this when model.scan_triton is imported: without a GPU its tests run in the
# interpreter on the CPU (tests/test_scan_triton.py)
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from servers import mlflow_server

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BENCH = SHARED / "data" / "sr-benchmarks"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Which tests that start Ray (marked ``ray``) may run at once, under ``-n N``.

    Local Rays of different processes live side by side; what they cannot live beside is a
    ``ray start`` cluster (a local ``ray.init()`` joins it) or its ``ray stop`` (which stops every
    Ray of the user). Only ``ray up``'s test makes such a cluster, and where the machine allows PID
    namespaces its nodes run in one of their own with a Ray temp folder of their own
    (tests/test_ray_up.py): then only the tests that share the session's smoke study are kept on
    one worker (xdist group "smoke", so the study is made once). Elsewhere every test that starts
    Ray is in the group "ray", which one worker runs in turn.
    """
    from servers import pid_namespaces

    _longest_first(items)
    isolated = pid_namespaces()
    for item in items:
        if item.get_closest_marker("ray") is None:
            continue
        if not isolated:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif "smoke_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smoke"))


# The modules whose tests run for minutes, the longest first. pytest-xdist hands tests to the
# workers in collection order, so a long test collected late ran on one worker while the other had
# nothing left (`ray up`'s test started after 8 of the 12 minutes); started first, the long tests
# overlap one another and the short ones fill the end.
LONG_MODULES = (
    "test_ray_up.py",
    "test_loop_e2e.py",
    "test_search_e2e.py",
    "test_real_study.py",
    "test_lcbench.py",
    "test_quality_cpu.py",
)


def _longest_first(items) -> None:
    """Order ``items`` in place: the LONG_MODULES' tests, then the other end-to-end ones, then the
    rest, each part in collection order."""

    def rank(item) -> tuple[int, int]:
        module = item.path.name
        if module in LONG_MODULES:
            return (0, LONG_MODULES.index(module))
        return (1 if item.get_closest_marker("e2e") else 2, 0)

    items.sort(key=rank)  # stable: within a rank, collection order


def pytest_configure(config):
    """Under ``-n N`` each xdist group runs on one worker (see pytest_collection_modifyitems).
    pytest-xdist 3.8 loses the groups under pytest 9.2 (pytest-dev/pytest-xdist#1386, found
    here): refuse to run rather than spread them."""
    from importlib.metadata import version

    if not getattr(config.option, "numprocesses", None):
        return
    xdist = tuple(int(p) for p in version("pytest-xdist").split(".")[:2])
    if pytest.version_tuple[:2] >= (9, 2) and xdist <= (3, 8):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {version('pytest-xdist')} runs the tests of "
            "one xdist group on several workers; install the versions the dev extra names "
            "(pip install -e '.[dev]') or run without -n"
        )


@pytest.fixture
def bench_dir() -> Path:
    """The shared SR test sets (present on developer machines and in CI)."""
    if not (BENCH / "Set5").is_dir():
        pytest.skip(f"shared SR benchmark images not found at {BENCH}")
    return BENCH


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def tiny_model():
    """The "tiny" preset with the same weights every call (the global random state untouched):
    tests that export it share one trace (trace_each_network_once)."""
    from model import build_model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model("tiny")


_TRACES: dict[tuple, bytes] = {}


def _trace_key(model, dummy, opset) -> tuple:
    """What a trace depends on: the network's class, config and weights, the input's shape and
    dtype (not its values) and the opset."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    net = (type(model).__qualname__, repr(model.cfg), weights.hexdigest())
    return (*net, tuple(dummy.shape), dummy.dtype, opset)


@pytest.fixture(scope="session", autouse=True)
def trace_each_network_once():
    """torch.onnx's dynamo trace takes about 5 s for the tiny network on 2 CPUs, and the suite
    exports the same network many times (each version the agent's tests register, the same
    checkpoint at several gates). A trace depends only on _trace_key, so the first trace of a key
    is kept and a later export of it gets a fresh copy of that graph; every other step of
    export_onnx (the checker, banned ops, the precision marks, ONNX Runtime against PyTorch, the
    file) runs as always. Exports in subprocesses (the search, the command lines) trace as users'
    do."""
    import onnx

    from model import export

    real = export._trace

    def traced_once(model, dummy, opset):
        key = _trace_key(model, dummy, opset)
        if key not in _TRACES:
            _TRACES[key] = real(model, dummy, opset).SerializeToString()
        return onnx.load_from_string(_TRACES[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "_trace", traced_once)
        yield


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real MLflow tracking server (SQLite, served artifacts) shared by the session's tests (one
    per pytest-xdist worker): each test works in experiments and registered models of its own names."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def mlflow_fail_fast(monkeypatch):
    # MLflow's client retries a dead server for minutes by default: no retry here (a refused
    # connection fails at once). The timeout is the agent CLI's (30 s): a live server on a busy
    # 2-core machine can take seconds to answer, and a report it did not take waits in the outbox
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


FINALIZE = "finalize:\n  iterations: 8\n"  # replaces the smoke config's last key (0 there)


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """The README's first command, once for the tests that read what it leaves behind: the smoke
    search (search/configs/smoke.yaml: local Ray, registration, the local edge agent, selection),
    its front finalized (retrained for ``finalize.iterations``: 8 steps here, as the full search
    does at length), against a real MLflow server of its own. The client's password is given MLflow's
    way (a planted secret, for the tests that look for it afterwards) and Ray's session folder is
    kept under a short path of its own, where it can be grepped.

    Tests that change what the study left behind put it back before they end. Under pytest-xdist
    they are in one xdist group (one worker, one study: pytest_collection_modifyitems)."""
    root = tmp_path_factory.mktemp("smoke")
    secret = "planted-" + secrets.token_hex(8)
    # Ray's Unix sockets need a short path (about 107 characters at most)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_USERNAME": "someuser",  # the test server has no auth: it ignores them
        "MLFLOW_TRACKING_PASSWORD": secret,
        "RAY_TMPDIR": str(ray_tmp),
    }
    work = root / "work"
    work.mkdir()
    try:
        with mlflow_server(root / "mlflow") as uri:
            config = work / "smoke-finalized.yaml"
            config.write_text((ROOT / "search" / "configs" / "smoke.yaml").read_text() + FINALIZE)
            cmd = [sys.executable, str(ROOT / "search" / "run.py"), "--config", str(config)]
            cmd += ["--tracking-uri", uri, "--storage-dir", str(work / "s"), "--json", str(work / "r.json")]
            out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            yield {
                "uri": uri,
                "out": out,
                "report": json.loads((work / "r.json").read_text()),
                "secret": secret,
                "work": work,  # the working directory, with Ray's storage and the agent's log and state
                "server_root": root / "mlflow",
                "ray_tmp": ray_tmp,
            }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
