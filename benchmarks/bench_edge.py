"""The edge agent on this machine: ONNX Runtime latency of the student, and pending -> done time.

    python -m benchmarks.bench_edge [--duration-s 10] [--skip-loop]

1. Exports the student preset (untrained weights: latency does not depend on them) at the
   deployment shape 1x3x64x64 and measures it with the agent's own protocol (``measure_file``,
   ONNX Runtime, no power sensor here) for ``--duration-s``.
2. Starts a real MLflow server (SQLite, served artifacts) in a temp dir, registers the same ONNX
   the way the search does, starts the agent's daemon loop in a thread (poll every 2 s) and times
   each stage from the version's creation to ``done`` on the version: claim, download + sha256,
   measurement, report. The measurement dominates by design (warm-up + idle + loaded window).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_student(out: Path) -> Path:
    from model import build_model
    from model.export import export_onnx

    export_onnx(build_model("student"), out, (1, 3, 64, 64), seed=0)
    return out


def bench_latency(onnx: Path, duration_s: float, state: Path) -> None:
    from edge_agent import power
    from edge_agent.agent import measure_file
    from edge_agent.fileio import sha256_file
    from edge_agent.measure import MeasureConfig

    m = measure_file(
        onnx,
        sha256_file(onnx),
        backend="onnxruntime",
        reader=power.UnavailableReader("benchmark: latency only"),
        cfg=MeasureConfig(warmup_s=2.0, idle_s=0.0, duration_s=duration_s),
        cache_dir=state,
    )
    print("\n| model | input | backend | images | p50 ms | p90 ms | p99 ms | mean ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| student | 1x3x64x64 | onnxruntime {m.info.get('onnxruntime_version')} "
        f"({m.info.get('ort_providers')}) "
        f"| {m.images} | {m.latency_ms_p50:.1f} | {m.latency_ms_p90:.1f} | {m.latency_ms_p99:.1f} "
        f"| {m.latency_ms_mean:.1f} |"
    )


def bench_loop(onnx: Path, tmp: Path) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(ROOT / "tests"))
    from edge_agent import contract
    from edge_agent.agent import Agent, AgentConfig, setup_logging
    from search.registry import register_candidate

    from servers import mlflow_server

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    setup_logging(stream=open(tmp / "agent.log", "w"))
    with mlflow_server(tmp / "mlflow") as uri:
        from model import build_model

        client = MlflowClient(uri)
        exp = client.create_experiment("bench-edge")
        run = client.create_run(exp).info.run_id
        net = build_model("student")
        ckpt = tmp / "student.pt"
        torch.save({"model_config": asdict(net.cfg), "model": net.state_dict()}, ckpt)
        client.log_artifact(run, str(ckpt), "checkpoint")
        cfg = AgentConfig(
            tracking_uri=uri,
            device="cpu-box",
            state_dir=tmp / "agent",
            poll_s=2.0,
            backend="onnxruntime",
            power="none",
        )
        agent = Agent(cfg)
        stamps: dict[str, float] = {}
        original_measure, original_deliver = agent._measure, agent.registry.deliver

        def timed_measure(v):
            stamps["claimed"] = time.monotonic()
            return original_measure(v)

        def timed_deliver(report):
            stamps["measured"] = time.monotonic()
            original_deliver(report)
            stamps["reported"] = time.monotonic()

        agent._measure, agent.registry.deliver = timed_measure, timed_deliver
        thread = threading.Thread(target=agent.run_forever, daemon=True)
        thread.start()
        t0 = time.monotonic()
        version = register_candidate(uri, run, contract.REGISTERED_MODEL, ("cpu-box",), input_size=64).version
        t_registered = time.monotonic()
        while client.get_model_version(contract.REGISTERED_MODEL, version).tags.get(
            contract.status_tag("cpu-box")
        ) not in (contract.DONE, contract.FAILED):
            time.sleep(0.1)
        t_done = time.monotonic()
        agent.request_stop()
        thread.join()
    print("\n| stage | seconds |")
    print("| --- | --- |")
    print(f"| export + register (search side) | {t_registered - t0:.1f} |")
    print(f"| registered -> claimed (poll 2 s, claim settle 2 s) | {stamps['claimed'] - t_registered:.1f} |")
    print(
        "| download, sha256, measure (2 s warm-up, 3 s idle, 10 s loaded) "
        f"| {stamps['measured'] - stamps['claimed']:.1f} |"
    )
    print(f"| report (run metrics + version tags) | {stamps['reported'] - stamps['measured']:.1f} |")
    print(f"| **registered -> done seen by a client** | **{t_done - t_registered:.1f}** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=10.0)
    ap.add_argument("--skip-loop", action="store_true", help="latency only, no MLflow server")
    args = ap.parse_args()
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        onnx = export_student(tmp / "student.onnx")
        bench_latency(onnx, args.duration_s, tmp / "engines")
        if not args.skip_loop:
            bench_loop(onnx, tmp)


if __name__ == "__main__":
    main()
