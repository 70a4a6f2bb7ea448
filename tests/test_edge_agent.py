"""The edge agent against a real MLflow server: claims, measurement, reports, outbox, failures.

Versions are registered the way the search registers them (``search.registry.register_candidate``
from a checkpoint on a trial run), measured with ONNX Runtime on this CPU, with power read by the
INA3221 reader from a fake sysfs tree whose values a thread changes over time.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from edge_agent import contract, power
from edge_agent.agent import Agent, AgentConfig
from edge_agent.measure import MeasureConfig
from edge_agent.mlflow_io import Registry
from search.registry import register_candidate

from conftest import tiny_model
from fakes import FakeIna3221
from servers import free_port, mlflow_server

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "orin-nano"
# two short windows; a limit on their spread that a shared test machine cannot trip (the retry and
# the unstable mark are tested in test_measure.py)
FAST = MeasureConfig(
    warmup_s=0.2, idle_s=0.8, duration_s=0.75, windows=2, pause_s=0.2, max_cv=10.0, rate_hz=50.0
)


pytestmark = [pytest.mark.usefixtures("mlflow_fail_fast"), pytest.mark.e2e]  # real MLflow servers


def register(uri: str, tmp: Path, model_name: str, devices=(DEVICE,)) -> tuple[str, str]:
    """A trial run with a tiny checkpoint, registered like the search does. Returns (run, version)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("edge-agent-tests") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("edge-agent-tests")
    run = client.create_run(exp_id, tags={contract.ROLE: contract.ROLE_TRIAL})
    net = tiny_model()  # one weight set: its export is traced once
    ckpt = tmp / f"{run.info.run_id}.pt"
    torch.save({"model_config": asdict(net.cfg), "model": net.state_dict()}, ckpt)
    client.log_artifact(run.info.run_id, str(ckpt), "checkpoint")
    client.set_terminated(run.info.run_id)
    reg = register_candidate(uri, run.info.run_id, model_name, tuple(devices), input_size=16)
    return run.info.run_id, reg.version


def make_agent(uri: str, tmp: Path, model_name: str, device: str = DEVICE, **kw) -> Agent:
    power_root = kw.pop("power_root", tmp / "no-sensor")
    reader_factory = kw.pop("reader_factory", None)
    clock = kw.pop("clock", time.time)
    cfg = AgentConfig(
        tracking_uri=uri,
        device=device,
        model_name=model_name,
        state_dir=tmp / f"state-{device}-{kw.pop('name', 'a')}",
        poll_s=0.5,
        claim_settle_s=kw.pop("claim_settle_s", 0.3),
        backend="onnxruntime",
        power=kw.pop("power", "none"),
        power_root=power_root,
        measure=kw.pop("measure", FAST),
        **kw,
    )
    return Agent(cfg, reader_factory=reader_factory, clock=clock)


def measurement(uri: str, tmp: Path, run_id: str, device: str = DEVICE) -> dict:
    """The run's measurement artifact for ``device``, as the agent wrote it."""
    from mlflow.tracking import MlflowClient

    dest = tmp / f"artifact-{run_id}-{device}"
    dest.mkdir(exist_ok=True)
    path = MlflowClient(uri).download_artifacts(run_id, contract.measurement_artifact(device), str(dest))
    return json.loads(Path(path).read_text())


def edge_tags(tags: dict[str, str], device: str = DEVICE) -> set[str]:
    """The names of the ``edge.<device>.*`` tags among ``tags``."""
    return {name for d, name in filter(None, map(contract.split_edge_key, tags)) if d == device}


CLAIM_TAGS = set(contract.CLAIM_TAGS)


def test_pending_to_done_with_power_from_a_changing_sysfs_tree(server, tmp_path):
    from mlflow.tracking import MlflowClient

    run_id, version = register(server, tmp_path, "m-power")
    client = MlflowClient(server)
    assert client.get_model_version("m-power", version).tags[contract.status_tag(DEVICE)] == contract.PENDING

    # idle-looking baseline plus a slow swing: trapezoids at 50 Hz must track it closely
    tree = FakeIna3221(tmp_path / "root", lambda t: 4000 + 1500 * math.sin(t * 2.0))
    try:
        agent = make_agent(server, tmp_path, "m-power", power="ina3221", power_root=tree.root)
        statuses = []
        original = agent._measure

        def spy(v):
            statuses.append(agent.registry.get(v.version).status(DEVICE))
            return original(v)

        agent._measure = spy
        assert agent.poll_once() == [version]
    finally:
        tree.close()
    assert statuses == [contract.MEASURING]
    assert version in agent.results, agent.registry.get(version).tags.get(contract.error_tag(DEVICE))
    m = agent.results[version]

    v = client.get_model_version("m-power", version)
    assert v.tags[contract.status_tag(DEVICE)] == contract.DONE
    assert v.tags[contract.edge_key(DEVICE, "power_source")] == "ina3221"
    # the finished version shows its status, figures, backend and power source: no claim, no note
    assert edge_tags(v.tags) == {"status", "backend", "power_source", *m.metrics()}
    metrics = client.get_run(run_id).data.metrics
    key = lambda name: contract.edge_key(DEVICE, name)  # noqa: E731
    for name in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "power_mw", "idle_power_mw"):
        assert metrics[key(name)] > 0, name
    assert metrics[key("latency_ms_p50")] <= metrics[key("latency_ms_p90")] <= metrics[key("latency_ms_p99")]

    # the integration against the exact integral of what the tree served, window by window
    assert len(m.windows) == FAST.windows and m.attempts == 1 and metrics[key("unstable")] == 0
    idle = tree.exact_mean_mw(m.idle_t0_s, m.idle_t1_s)
    assert metrics[key("idle_power_mw")] == pytest.approx(idle, rel=5e-3)
    energies = []
    for w in m.windows:
        loaded = tree.exact_mean_mw(w.t0_s, w.t1_s)
        assert w.power_mw == pytest.approx(loaded, rel=5e-3)
        # energy per image is net of idle: it follows from the two reported powers exactly...
        per_image_s = (w.t1_s - w.t0_s) / w.images
        assert w.energy_mj_per_image == pytest.approx((w.power_mw - m.idle_power_mw) * per_image_s, rel=1e-9)
        # ...and its error against the exact integral is bounded by the two windows' errors added, not
        # by a relative tolerance on the difference (two close means make that difference small)
        bound = 5e-3 * (loaded + idle) * per_image_s
        assert abs(w.energy_mj_per_image - (loaded - idle) * per_image_s) <= bound
        energies.append(w.energy_mj_per_image)
    # the reported figures are the windows' means
    assert metrics[key("power_mw")] == pytest.approx(sum(w.power_mw for w in m.windows) / len(m.windows))
    assert metrics[key("energy_mj_per_image")] == pytest.approx(sum(energies) / len(energies))
    run_tags = client.get_run(run_id).data.tags
    assert run_tags[key("backend")] == "onnxruntime"
    assert edge_tags(run_tags) == {"backend", "power_source"}  # no agent or result id, no info
    # the rest is in the run's one JSON artifact
    report = measurement(server, tmp_path, run_id)
    assert report["agent_id"] == agent.cfg.agent_id and len(report["result_id"]) == 32
    assert report["status"] == contract.DONE and report["metrics"] == m.metrics()
    info = report["measurement"]["info"]
    assert info["onnxruntime_version"] and info["power_rail"] == "VDD_IN" and "rails" in info
    assert report["measurement"]["images"] == m.images  # the windows and the protocol's settings too
    assert report["measurement"]["protocol"]["rate_hz"] == FAST.rate_hz


def test_outbox_delivers_after_the_server_comes_back(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, port = tmp_path / "srv", free_port()
    with ExitStack() as stack:
        uri = stack.enter_context(mlflow_server(root, port=port))
        run_id, version = register(uri, tmp_path, "m-outbox")
        agent = make_agent(uri, tmp_path, "m-outbox")
        original = agent._measure

        def measure_then_lose_server(v):
            result = original(v)
            stack.close()  # the server goes away between measuring and reporting
            return result

        agent._measure = measure_then_lose_server
        agent.poll_once()
    assert len(agent.outbox.pending()) == 1
    # the agent stays up while the server is down: a pass fails, nothing is lost
    with pytest.raises(Exception):  # noqa: B017 (whatever the client raises for a refused connection)
        agent.poll_once()
    assert len(agent.outbox.pending()) == 1

    with mlflow_server(root, port=port) as uri2:
        assert uri2 == uri
        agent._measure = original
        assert agent.poll_once() == []  # delivered, not measured again
        assert agent.outbox.pending() == []
        client = MlflowClient(uri)
        v = client.get_model_version("m-outbox", version)
        assert v.tags[contract.status_tag(DEVICE)] == contract.DONE
        assert not edge_tags(v.tags) & CLAIM_TAGS
        for name in contract.EDGE_METRICS:
            if name in agent.results[version].metrics():
                history = client.get_metric_history(run_id, contract.edge_key(DEVICE, name))
                assert len(history) == 1, name  # nothing doubled


def test_redelivery_of_a_report_does_not_double_metrics(server, tmp_path):
    from mlflow.tracking import MlflowClient

    from edge_agent.outbox import Report

    run_id, version = register(server, tmp_path, "m-redeliver")
    # the same report delivered twice, as the outbox does after a crash between send and delete
    r = Report(
        result_id="same-id",
        model_name="m-redeliver",
        version=version,
        run_id=run_id,
        device="other-dev",
        status=contract.DONE,
        timestamp_ms=1,
        metrics={"latency_ms_p50": 3.0},
        tags={"backend": "onnxruntime"},
    )
    registry = Registry(server, "m-redeliver")
    registry.deliver(r)
    registry.deliver(r)
    history = MlflowClient(server).get_metric_history(
        run_id, contract.edge_key("other-dev", "latency_ms_p50")
    )
    assert [h.value for h in history] == [3.0]
    assert edge_tags(MlflowClient(server).get_run(run_id).data.tags, "other-dev") == {"backend"}
    assert measurement(server, tmp_path, run_id, "other-dev")["result_id"] == "same-id"


def test_a_delivery_cut_off_after_the_metrics_is_retried_without_logging_them_again(server, tmp_path):
    """The artifact upload fails after ``log_batch`` landed: the version stays ``measuring`` under
    this agent's claim, the report waits in the outbox, and the retry sends no metric again.
    (MLflow's SQL store would drop an identical metric by itself, so the metric history alone
    could not show a resend: the client's calls are recorded too.)"""
    from mlflow.tracking import MlflowClient

    run_id, version = register(server, tmp_path, "m-retry")
    agent = make_agent(server, tmp_path, "m-retry")
    client = agent.registry.client
    real_log_batch, real_log_dict = client.log_batch, client.log_dict
    sent, cuts = [], [ConnectionResetError("the connection was reset during the upload")]

    def log_batch(run_id, metrics=(), **kw):
        sent.append(sorted(m.key for m in metrics))
        return real_log_batch(run_id, metrics=metrics, **kw)

    def log_dict(*args, **kw):
        if cuts:
            raise cuts.pop()
        return real_log_dict(*args, **kw)

    client.log_batch, client.log_dict = log_batch, log_dict
    assert agent.poll_once() == [version]
    [waiting] = agent.outbox.pending()
    tags = agent.registry.get(version).tags
    assert tags[contract.status_tag(DEVICE)] == contract.MEASURING  # the status is written last
    assert tags[contract.edge_key(DEVICE, contract.TAG_CLAIMED_BY)] == agent.cfg.agent_id

    assert agent.poll_once() == []  # delivered from the outbox, not measured again
    assert agent.outbox.pending() == []
    figures = agent.results[version].metrics()
    assert sent == [sorted(contract.edge_key(DEVICE, k) for k in figures), []]
    for name in figures:
        assert len(MlflowClient(server).get_metric_history(run_id, contract.edge_key(DEVICE, name))) == 1
    assert measurement(server, tmp_path, run_id)["result_id"] == waiting.result_id
    tags = agent.registry.get(version).tags
    assert tags[contract.status_tag(DEVICE)] == contract.DONE
    assert not edge_tags(tags) & CLAIM_TAGS


def test_no_power_source_leaves_a_short_note_and_the_whole_reason_in_the_artifact(server, tmp_path):
    from mlflow.tracking import MlflowClient

    reason = "; ".join(
        f"{s}: not found under /sys (looked in {i} places)" for i, s in enumerate(power.SOURCES * 5)
    )
    assert len(reason) > contract.POWER_NOTE_CHARS
    run_id, version = register(server, tmp_path, "m-nopower")
    agent = make_agent(server, tmp_path, "m-nopower", reader_factory=lambda: power.UnavailableReader(reason))
    assert agent.poll_once() == [version]
    assert agent.outbox.pending() == []  # delivered, not waiting for the server
    client = MlflowClient(server)
    run_tags = client.get_run(run_id).data.tags
    version_tags = client.get_model_version("m-nopower", version).tags
    note = run_tags[contract.edge_key(DEVICE, contract.TAG_POWER_NOTE)]
    assert len(note) == contract.POWER_NOTE_CHARS and reason.startswith(note.removesuffix("..."))
    assert version_tags[contract.edge_key(DEVICE, contract.TAG_POWER_NOTE)] == note
    assert edge_tags(run_tags) == {"backend", "power_source", "power_note"}
    assert run_tags[contract.edge_key(DEVICE, "power_source")] == "unavailable"
    assert contract.edge_key(DEVICE, contract.POWER) not in client.get_run(run_id).data.metrics
    assert measurement(server, tmp_path, run_id)["measurement"]["info"][power.UNAVAILABLE_REASON] == reason

    # a short reason is kept whole
    run_id, version = register(server, tmp_path, "m-nopower")
    assert make_agent(server, tmp_path, "m-nopower", name="off").poll_once() == [version]
    note = client.get_run(run_id).data.tags[contract.edge_key(DEVICE, contract.TAG_POWER_NOTE)]
    assert note == "power measurement was switched off (power source 'none')"


def test_corrupt_onnx_and_checksum_mismatch_end_as_failed(server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server)
    _, bad_sha = register(server, tmp_path, "m-fail")
    client.set_model_version_tag("m-fail", bad_sha, contract.TAG_SHA256, "0" * 64)

    # a corrupt ONNX file whose registered checksum is right: the backend must refuse it
    run_id, corrupt = register(server, tmp_path, "m-fail")
    garbage = tmp_path / "onnx" / contract.ONNX_FILE
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a protobuf" * 10)
    client.log_artifact(run_id, str(garbage), contract.ONNX_ARTIFACT_DIR)  # overwrites model.onnx
    import hashlib

    client.set_model_version_tag(
        "m-fail", corrupt, contract.TAG_SHA256, hashlib.sha256(garbage.read_bytes()).hexdigest()
    )

    agent = make_agent(server, tmp_path, "m-fail")
    agent.poll_once()
    v1 = client.get_model_version("m-fail", bad_sha).tags
    assert v1[contract.status_tag(DEVICE)] == contract.FAILED
    assert "sha256 mismatch" in v1[contract.error_tag(DEVICE)]
    v2 = client.get_model_version("m-fail", corrupt).tags
    assert v2[contract.status_tag(DEVICE)] == contract.FAILED
    assert "ONNX Runtime could not load" in v2[contract.error_tag(DEVICE)]
    assert not (edge_tags(v1) | edge_tags(v2)) & CLAIM_TAGS
    assert agent.results == {}
    assert client.get_run(run_id).data.tags[contract.error_tag(DEVICE)].startswith("BackendError")


def test_two_device_types_measure_once_each(server, tmp_path):
    from mlflow.tracking import MlflowClient

    _, version = register(server, tmp_path, "m-two")
    a = make_agent(server, tmp_path, "m-two", device=DEVICE, name="a")
    b = make_agent(server, tmp_path, "m-two", device="cpu-box", name="b")  # no tag yet: a new type
    assert a.poll_once() == [version]
    assert b.poll_once() == [version]
    again = make_agent(server, tmp_path, "m-two", device=DEVICE, name="c")
    assert again.poll_once() == []
    tags = MlflowClient(server).get_model_version("m-two", version).tags
    assert tags[contract.status_tag(DEVICE)] == tags[contract.status_tag("cpu-box")] == contract.DONE


def test_two_agents_of_one_type_racing_measure_once(server, tmp_path):
    _, version = register(server, tmp_path, "m-race")
    agents = [make_agent(server, tmp_path, "m-race", name=n, claim_settle_s=1.0) for n in "xy"]
    barrier = threading.Barrier(2)
    done: dict[str, list[str]] = {}

    def go(agent):
        barrier.wait()
        done[agent.cfg.agent_id] = agent.poll_once()

    threads = [threading.Thread(target=go, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(v) for v in done.values()) == [0, 1]


def test_a_claim_write_refused_by_the_store_is_written_again(server, tmp_path):
    """MLflow's SQL store refuses one of two simultaneous inserts of a new tag (UNIQUE constraint):
    the claim writes it again, then settles and re-reads as usual; refused twice, the poll fails and
    the version stays pending."""
    _, version = register(server, tmp_path, "m-conflict")
    agent = make_agent(server, tmp_path, "m-conflict", claim_settle_s=0.1)
    real = agent.registry.set_tags
    owner = contract.edge_key(DEVICE, contract.TAG_CLAIMED_BY)

    def refused(times: int):
        left = [times]

        def set_tags(v, tags):
            if owner in tags and left[0] > 0:  # another agent's insert lands first, ours is refused
                left[0] -= 1
                real(v, {owner: "other-agent"})
                raise RuntimeError("UNIQUE constraint failed: model_version_tags.key")
            real(v, tags)

        return set_tags

    agent.registry.set_tags = refused(2)
    with pytest.raises(RuntimeError, match="UNIQUE"):  # refused again: a real failure, the poll fails
        agent.poll_once()
    assert agent.registry.get(version).status(DEVICE) == contract.PENDING
    agent.registry.set_tags = refused(1)
    assert agent.poll_once() == [version]  # written again: ours is the claim the re-read finds
    assert agent.registry.get(version).status(DEVICE) == contract.DONE


def test_stale_claim_is_taken_over_and_a_fresh_one_is_not(server, tmp_path):
    _, version = register(server, tmp_path, "m-stale")
    reg = Registry(server, "m-stale")
    now = time.time()
    reg.set_tags(
        version,
        {
            contract.status_tag(DEVICE): contract.MEASURING,
            contract.edge_key(DEVICE, contract.TAG_CLAIMED_BY): "dead-agent",
            contract.edge_key(DEVICE, contract.TAG_HEARTBEAT): f"{now - 100:.3f}",
        },
    )
    patient = make_agent(server, tmp_path, "m-stale", name="p", takeover_s=1000.0)
    assert patient.poll_once() == []
    eager = make_agent(server, tmp_path, "m-stale", name="e", takeover_s=50.0)
    assert eager.poll_once() == [version]
    assert reg.get(version).status(DEVICE) == contract.DONE


def test_a_live_claim_is_judged_by_its_claimers_takeover_time_not_the_observers(server, tmp_path):
    _, version = register(server, tmp_path, "m-periods")
    patient = make_agent(server, tmp_path, "m-periods", name="p", takeover_s=1000.0)
    assert patient.claim(version)  # it beats every 250 s; the claim says: stale after 1000 s
    tags = patient.registry.get(version).tags
    assert tags[contract.edge_key(DEVICE, contract.TAG_STALE_AFTER)] == "1000"
    beat = float(tags[contract.edge_key(DEVICE, contract.TAG_HEARTBEAT)])
    # 100 s after the last beat: alive for its claimer, but twice an eager agent's own takeover time
    eager = make_agent(server, tmp_path, "m-periods", name="e", takeover_s=50.0, clock=lambda: beat + 100)
    assert eager.poll_once() == []
    tags = eager.registry.get(version).tags
    assert tags[contract.edge_key(DEVICE, contract.TAG_CLAIMED_BY)] == patient.cfg.agent_id
    assert tags[contract.status_tag(DEVICE)] == contract.MEASURING
    # 1001 s of silence: the claimer is gone by its own measure, and the eager agent takes over
    late = make_agent(server, tmp_path, "m-periods", name="l", takeover_s=50.0, clock=lambda: beat + 1001)
    assert late.poll_once() == [version]
    assert not edge_tags(late.registry.get(version).tags) & CLAIM_TAGS  # all three claim tags gone


def test_a_heartbeat_period_as_long_as_the_takeover_time_is_refused():
    with pytest.raises(ValueError, match="heartbeat period .* shorter than the takeover"):
        AgentConfig(tracking_uri="http://x", device=DEVICE, takeover_s=10.0, heartbeat_s=10.0)
    assert AgentConfig(tracking_uri="http://x", device=DEVICE, takeover_s=4.0).heartbeat_period == 2.0
    assert AgentConfig(tracking_uri="http://x", device=DEVICE).heartbeat_period == 450.0


def test_heartbeat_is_refreshed_during_a_long_measurement(server, tmp_path):
    _, version = register(server, tmp_path, "m-beat")
    agent = make_agent(server, tmp_path, "m-beat", heartbeat_s=0.3, measure=replace(FAST, duration_s=1.0))
    beats = []
    original = agent.heartbeat

    def spy(v):
        before = time.time()
        original(v)
        beats.append((before, time.time()))

    beat_tag = contract.edge_key(DEVICE, contract.TAG_HEARTBEAT)
    stored = []
    real_deliver = agent.registry.deliver

    def deliver(report):  # the heartbeat as the measurement left it; delivery removes it
        stored.append(float(agent.registry.get(version).tags[beat_tag]))
        real_deliver(report)

    agent.heartbeat, agent.registry.deliver = spy, deliver
    assert agent.poll_once() == [version]
    assert len(beats) >= 4  # one before measuring, then every 0.3 s of a ~3 s measurement
    before, after = beats[-1]
    assert before - 5e-4 <= stored[0] <= after + 5e-4  # the last beat's value (written to the ms) stayed
    assert beat_tag not in agent.registry.get(version).tags


def test_sigterm_hands_the_claim_back(server, tmp_path):
    _, version = register(server, tmp_path, "m-term")
    cmd = [sys.executable, "-m", "edge_agent", "run", "--once", "--tracking-uri", server, "--device", DEVICE]
    cmd += ["--model-name", "m-term", "--backend", "onnxruntime", "--power", "none"]
    cmd += [
        "--state-dir",
        str(tmp_path / "state"),
        "--warmup-s",
        "0.1",
        "--idle-s",
        "0.1",
        "--duration-s",
        "60",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines, claimed = [], threading.Event()

    def read_log():
        for line in proc.stdout:
            lines.append(line)
            if '"msg": "claimed"' in line:  # the settle is over: the claim is the agent's
                claimed.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not claimed.wait(0.2):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
    time.sleep(3.0)  # past the download and the session's start, into the 60 s loaded window
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out
    # stdout and stderr are one JSON log (journald's): no download progress bar, no other chatter
    assert not [line for line in lines if line.strip() and not line.startswith("{")], out
    assert all(isinstance(json.loads(line), dict) for line in lines if line.strip())
    assert "stopped during a loaded window" in out
    assert '"msg": "handed the claim back"' in out
    reg = Registry(server, "m-term")
    tags = reg.get(version).tags
    assert tags[contract.status_tag(DEVICE)] == contract.PENDING
    assert not edge_tags(tags) & CLAIM_TAGS  # claimed_by and heartbeat both gone


def test_a_stop_during_the_claims_settle_hands_it_back_before_any_download(server, tmp_path):
    """SIGTERM while the claim settles: the claim goes back at once, without downloading the ONNX
    and building an engine (minutes on a Jetson) only to throw them away."""
    _, version = register(server, tmp_path, "m-settle")
    agent = make_agent(server, tmp_path, "m-settle", claim_settle_s=30.0)
    status = contract.status_tag(DEVICE)
    real_set_tags, real_download = agent.registry.set_tags, agent.registry.download_onnx
    downloads, timers = [], []

    def set_tags(v, tags):
        real_set_tags(v, tags)
        if tags.get(status) == contract.MEASURING:  # the claim's last write: the settle begins
            timers.append(threading.Timer(0.3, agent.request_stop))
            timers[-1].start()

    def download_onnx(*args, **kwargs):
        downloads.append(args)
        return real_download(*args, **kwargs)

    agent.registry.set_tags, agent.registry.download_onnx = set_tags, download_onnx
    start = time.monotonic()
    assert agent.poll_once() == []
    assert time.monotonic() - start < 20  # the stop cut the 30 s settle short
    assert len(timers) == 1 and downloads == []
    tags = agent.registry.get(version).tags
    assert tags[status] == contract.PENDING
    assert not edge_tags(tags) & CLAIM_TAGS  # claimed_by and heartbeat both gone


def test_measure_cli_prints_json(tmp_path):
    from model.export import export_onnx

    onnx = tmp_path / "tiny.onnx"
    export_onnx(tiny_model(), onnx, (1, 3, 16, 16), fp16=False)
    cmd = [
        sys.executable,
        "-m",
        "edge_agent",
        "measure",
        str(onnx),
        "--power",
        "none",
        "--backend",
        "onnxruntime",
    ]
    cmd += [
        "--warmup-s",
        "0.1",
        "--idle-s",
        "0.2",
        "--duration-s",
        "0.25",
        "--windows",
        "2",
        "--pause-s",
        "0.1",
    ]
    cmd += ["--state-dir", str(tmp_path / "s")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert (
        out["backend"] == "onnxruntime" and out["power_mw"] is None and out["power_source"] == "unavailable"
    )
    assert 0 < out["latency_ms_p50"] <= out["latency_ms_p99"]
    assert len(out["windows"]) == 2 and out["images"] == sum(w["images"] for w in out["windows"]) >= 10
    assert out["latency_ms_std"] >= 0 and out["energy_cv"] is None and out["unstable"] in (True, False)

    missing = subprocess.run(
        cmd[:4] + [str(tmp_path / "nope.onnx")], capture_output=True, text=True, cwd=ROOT
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_sampler_gap_rejects_the_window(tmp_path):
    """A sensor that stalls mid-window: the measurement refuses to integrate across the gap."""
    from edge_agent.measure import MeasurementError, measure_engine

    class Engine:
        backend, input_shape = "fake", (1,)

        def infer(self):
            time.sleep(0.002)

        def versions(self):
            return {}

        def close(self):
            pass

    class Stalling:
        name, available, self_paced = "fake", True, False

        def __init__(self):
            self.t_start = time.monotonic()

        def read(self):
            t = time.monotonic()
            if 0.6 < t - self.t_start < 1.4:
                time.sleep(0.9)  # the sensor stalls
            return power.PowerSample(t_s=time.monotonic(), power_mw=1000.0)

        def close(self):
            pass

        def describe(self):
            return {"power_source": "fake"}

    cfg = replace(FAST, warmup_s=0.0, idle_s=0.5, duration_s=1.5, windows=1, rate_hz=50.0)
    with pytest.raises(MeasurementError, match="gap"):
        measure_engine(Engine(), Stalling(), cfg)


def test_a_version_marked_fp32_only_is_built_in_fp32(server, tmp_path, monkeypatch):
    """The export's fp16 gate marks a version fp32-only; the agent then builds fp32 even when it
    runs with --precision fp16 (its default), and fp16 for an unmarked one."""
    from mlflow.tracking import MlflowClient

    import edge_agent.agent as agent_module

    client = MlflowClient(server)
    _, marked = register(server, tmp_path, "m-prec")
    _, plain = register(server, tmp_path, "m-prec")
    assert client.get_model_version("m-prec", plain).tags[contract.TAG_PRECISION] == contract.FP16_OK
    client.set_model_version_tag("m-prec", marked, contract.TAG_PRECISION, contract.FP32_ONLY)
    seen = []
    real = agent_module.measure_file

    def recording(model, sha256, **kw):
        seen.append((Path(model).parents[1].name, kw["precision"]))  # downloads/<name>-v<version>/onnx/
        return real(model, sha256, **kw)

    monkeypatch.setattr(agent_module, "measure_file", recording)
    agent = make_agent(server, tmp_path, "m-prec")
    assert agent.cfg.precision == "fp16"
    agent.poll_once()
    assert sorted(seen) == sorted([(f"m-prec-v{marked}", "fp32"), (f"m-prec-v{plain}", "fp16")])
