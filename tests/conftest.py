"""Shared test helpers: where ../shared lives, small image folders."""

import os
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server (SQLite, served artifacts) for the module's tests."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def mlflow_fail_fast(monkeypatch):
    # MLflow's client retries a dead server for minutes by default; the agent's CLI sets the same
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
