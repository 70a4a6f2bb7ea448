"""Engine backends without TensorRT: the 8.6/10.x adapter against stand-in modules, trtexec through
a stand-in script that prints recorded output, ONNX Runtime for real."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_agent import backends, power
from edge_agent.agent import measure_file
from edge_agent.fileio import sha256_file
from edge_agent.measure import MeasureConfig
from model.export import export_onnx

from conftest import tiny_model

# the summary lines recorded in ../shared/fixtures/README.md (TensorRT 10.x trtexec)
TRTEXEC_SUMMARY = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=model.onnx
[11/28/2026-10:00:00] [I] Throughput: 1099.65 qps
[11/28/2026-10:00:00] [I] Latency: min = 1.12085 ms, max = 5.30969 ms, mean = 1.17602 ms, median = 1.17322 ms, percentile(90%) = 1.18164 ms, percentile(95%) = 1.18457 ms, percentile(99%) = 1.20386 ms
[11/28/2026-10:00:00] [I] GPU Compute Time: min = 0.803711 ms, max = 4.93372 ms, mean = 0.818735 ms, median = 0.809937 ms, percentile(90%) = 0.811035 ms, percentile(95%) = 0.811035 ms, percentile(99%) = 0.812012 ms
"""  # noqa: E501


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_model(), path, (1, 3, 16, 16), fp16=False)
    return path


def test_trtexec_version_banner():
    assert backends.trtexec_version("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec") == "10.3.0"
    assert backends.trtexec_version("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec") == "8.6.1"
    assert backends.trtexec_version("no banner") == "unknown"


def _stand_in(tmp: Path) -> Path:
    """A ``trtexec`` that logs its argv, writes the engine it was asked to save, prints the summary."""
    script = tmp / "bin" / "trtexec"
    script.parent.mkdir()
    summary = tmp / "summary.txt"
    summary.write_text(TRTEXEC_SUMMARY)
    script.write_text(
        f"""#!{sys.executable}
import json, sys, time
with open({str(tmp / "calls.jsonl")!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
for a in sys.argv[1:]:
    if a.startswith("--saveEngine="):
        open(a.split("=", 1)[1], "wb").write(b"plan")
    if a.startswith("--duration="):
        time.sleep(min(float(a.split("=", 1)[1]), 2))
print(open({str(summary)!r}).read())
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_trtexec_builds_once_with_the_scan_pinned_then_loads(tmp_path, tiny_onnx):
    exe = _stand_in(tmp_path)
    sha = sha256_file(tiny_onnx)
    first = backends.run_trtexec(tiny_onnx, sha, "fp16", tmp_path / "engines", 1.0, 0.2, exe=str(exe))
    assert first.trt_version == "10.3.0"
    assert first.summary.throughput_qps == pytest.approx(1099.65)
    assert first.summary.latency.percentiles_ms[99.0] == pytest.approx(1.20386)
    backends.run_trtexec(tiny_onnx, sha, "fp16", tmp_path / "engines", 1.0, 0.2, exe=str(exe))
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    builds = [c for c in calls if c != ["--help"]]
    assert len(builds) == 2
    build, load = builds
    assert f"--onnx={tiny_onnx}" in build and "--fp16" in build and "--precisionConstraints=obey" in build
    (spec,) = [a for a in build if a.startswith("--layerPrecisions=")]
    layers = spec.split("=", 1)[1].split(",")
    assert layers and all(x.startswith("fp32_scan/") and x.endswith(":fp32") for x in layers)
    engine = tmp_path / "engines" / f"{sha[:16]}-trt10.3.0-fp16.engine"
    assert f"--saveEngine={engine}" in build
    assert f"--loadEngine={engine}" in load and not any(a.startswith("--onnx=") for a in load)


def test_trtexec_failure_names_the_exit_code(tmp_path, tiny_onnx):
    exe = tmp_path / "trtexec"
    exe.write_text("#!/bin/sh\necho '[E] Error[4]: network has no outputs' >&2\nexit 3\n")
    exe.chmod(0o755)
    with pytest.raises(backends.BackendError, match="exited with 3"):
        backends.run_trtexec(tiny_onnx, "ab" * 32, "fp32", tmp_path, 1.0, 0.1, exe=str(exe))


class ConstantReader:
    name, available, self_paced = "fake", True, False

    def read(self):
        import time

        return power.PowerSample(t_s=time.monotonic(), power_mw=2500.0)

    def close(self):
        pass

    def describe(self):
        return {"power_source": "fake"}


def test_measure_with_trtexec_uses_its_figures(tmp_path, tiny_onnx, monkeypatch):
    exe = _stand_in(tmp_path)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    cfg = MeasureConfig(warmup_s=0.1, idle_s=0.4, duration_s=1.0, rate_hz=50)
    m = measure_file(
        tiny_onnx,
        sha256_file(tiny_onnx),
        backend="trtexec",
        reader=ConstantReader(),
        cfg=cfg,
        cache_dir=tmp_path / "e",
    )
    assert m.backend == "trtexec" and m.info["tensorrt_version"] == "10.3.0"
    assert (m.latency_ms_p50, m.latency_ms_p90, m.latency_ms_p99) == (1.17322, 1.18164, 1.20386)
    assert m.throughput_ips == pytest.approx(1099.65, rel=0.01)
    assert m.power_mw == pytest.approx(2500.0) and m.energy_mj_per_image == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- TensorRT adapter


def fake_trt(version: str):
    """The parts of the tensorrt module the adapter touches, with TensorRT's real names."""
    return SimpleNamespace(
        __version__=version,
        float32="float32",
        float16="float16",
        NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0),
        BuilderFlag=SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY"),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
    )


class FakeTensor:
    def __init__(self, dtype):
        self.dtype = dtype


class FakeLayer:
    def __init__(self, name, dtype="float16"):
        self.name, self.precision, self.num_outputs = name, None, 1
        self.outputs = [FakeTensor(dtype)]
        self.output_types = {}

    def get_output(self, i):
        return self.outputs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class FakeNetwork:
    def __init__(self, names):
        self.layers = [FakeLayer(n) for n in names]
        self.num_layers = len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class FakeConfig:
    def __init__(self):
        self.flags, self.pools = [], {}

    def set_flag(self, flag):
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size


@pytest.mark.parametrize("version,flags", [("8.6.1", 1), ("10.3.0", 0), ("10.13.2.6", 0)])
def test_network_flags_per_version(version, flags):
    assert backends._TrtApi(fake_trt(version)).network_flags() == flags


def test_older_tensorrt_is_refused():
    with pytest.raises(backends.BackendError, match="8.5.3 is too old"):
        backends._TrtApi(fake_trt("8.5.3"))


def test_scan_layers_are_pinned_to_fp32_and_fp16_obeys_them():
    api = backends._TrtApi(fake_trt("10.3.0"))
    net = FakeNetwork(["conv_first/Conv", "fp32_scan/MatMul_3", "fp32_scan/Exp", "body/Add"])
    assert api.pin_fp32(net) == 2
    pinned = {layer.name: (layer.precision, layer.output_types) for layer in net.layers}
    assert pinned["fp32_scan/MatMul_3"] == ("float32", {0: "float32"})
    assert pinned["fp32_scan/Exp"] == ("float32", {0: "float32"})
    assert pinned["conv_first/Conv"] == (None, {}) and pinned["body/Add"] == (None, {})
    cfg = FakeConfig()
    api.configure(cfg, "fp16", 1 << 28)
    assert cfg.flags == ["FP16", "OBEY"] and cfg.pools == {"WORKSPACE": 1 << 28}
    cfg32 = FakeConfig()
    api.configure(cfg32, "fp32", 1 << 28)
    assert cfg32.flags == []


def test_engine_key_names_what_the_engine_depends_on():
    key = backends.EngineKey("f" * 64, "10.3.0", "fp16")
    assert key.filename() == "ffffffffffffffff-trt10.3.0-fp16.engine"
    assert key.filename() != backends.EngineKey("f" * 64, "8.6.1", "fp16").filename()
    assert key.filename() != backends.EngineKey("f" * 64, "10.3.0", "fp32").filename()


# ----------------------------------------------------------------------------- ONNX Runtime


def test_onnxruntime_engine_runs_and_reports_versions(tiny_onnx):
    engine = backends.open_engine("onnxruntime", tiny_onnx, "x", "fp32", Path("/nonexistent"))
    engine.infer()
    assert engine.input_shape == (1, 3, 16, 16)
    assert engine.versions()["ort_providers"] == "CPUExecutionProvider"
    engine.close()


def test_bad_backend_and_precision_are_refused(tiny_onnx):
    with pytest.raises(backends.BackendError, match="unknown backend"):
        backends.resolve_backend("openvino")
    with pytest.raises(backends.BackendError, match="unknown precision"):
        backends.open_engine("onnxruntime", tiny_onnx, "x", "int8", Path("."))


def test_info_reports_the_power_sources_it_finds(tmp_path):
    import subprocess

    from fakes import FakeIna3221

    tree = FakeIna3221(tmp_path / "root", lambda t: 4200.0)
    try:
        cmd = [sys.executable, "-m", "edge_agent", "info", "--power-root", str(tree.root)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    finally:
        tree.close()
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["power_sources"]["ina3221"]["power_rail"] == "VDD_IN"
    assert info["power_sources"]["rapl"]["available"] == "no"
    assert info["backends"]["auto"] in backends.BACKENDS
    assert info["device"]["python_version"]


def test_the_agent_never_imports_torch_or_ray():
    """The device install stays light: every agent module loads without torch and ray."""
    import subprocess

    code = (
        "import sys, importlib, pkgutil, edge_agent\n"
        "for m in pkgutil.iter_modules(edge_agent.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('edge_agent.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'ray'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
