"""The daemon: claim pending versions for this device type, measure them, report back.

One pass (``Agent.poll_once``):

1. deliver whatever waits in the outbox (reports the server could not take earlier);
2. list the model's versions; a version is ours to measure when its ``edge.<device>.status`` is
   ``pending`` or missing (a device type added after registration measures old candidates too),
   or ``measuring`` with a heartbeat older than its claimer's ``takeover_s`` (its agent died;
   the claimer writes that period into the claim, so agents started with different ones agree);
3. claim it: re-read the version, set ``measuring`` + ``claimed_by`` + ``heartbeat`` +
   ``stale_after_s``, wait
   ``claim_settle_s``, re-read; if another agent's id is there, it won and we move on; if a stop
   came during the wait, the claim goes back at once, before any download. The registry has no
   compare-and-set, so this is a claim with a settle window, not a lock: two agents of one
   device type would both measure only if one of them stalled longer than the settle window
   between its fresh read and its write (normally milliseconds). A tag write the store refuses
   because the other agent inserted the same tag at that instant is written again. Different
   device types never compete;
4. download the ONNX, check its sha256 against the version's ``onnx_sha256``, build or reuse
   the engine, measure;
5. write the report to the outbox, then deliver it (metrics, a few tags and one JSON artifact on
   the trial run; figures and ``done``/``failed`` on the version, whose claim tags then go). If
   the server is gone the report stays in the outbox and a later pass sends it.

SIGTERM (``request_stop``) aborts a measurement between inferences and hands the claim back
(status ``pending`` again, the claim tags removed). Logs are one JSON object per line on stdout,
for journald.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_agent import backends, contract, power
from edge_agent.device import collect_device_info
from edge_agent.fileio import sha256_file
from edge_agent.measure import Interrupted, MeasureConfig, Measurement, measure_engine, measure_trtexec
from edge_agent.mlflow_io import Registry, Version
from edge_agent.outbox import Outbox, Report

log = logging.getLogger("edge_agent.agent")
STATE_DIR = Path("~/.cache/mambalitesr-edge-agent")  # engine cache, outbox, downloads


@dataclass(frozen=True)
class AgentConfig:
    tracking_uri: str
    device: str  # device *type* (orin-nano): agents of one type share the work
    model_name: str = contract.REGISTERED_MODEL
    state_dir: Path = STATE_DIR
    poll_s: float = 30.0
    takeover_s: float = 1800.0  # this agent's claims are taken over after this long without a heartbeat
    heartbeat_s: float | None = None  # refresh period while measuring; see heartbeat_period
    claim_settle_s: float = 2.0
    backend: str = "auto"
    precision: str = "fp16"
    power: str = "auto"
    power_root: Path = Path("/")
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    max_backoff_s: float = 300.0
    agent_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )

    def __post_init__(self) -> None:
        contract.status_tag(self.device)  # validates the name
        if self.heartbeat_period >= self.takeover_s:
            raise ValueError(
                f"the heartbeat period ({self.heartbeat_period:g} s) must be shorter than the takeover "
                f"time ({self.takeover_s:g} s), or other agents take over this agent's live claims"
            )
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser())

    @property
    def heartbeat_period(self) -> float:
        """Seconds between heartbeats: ``heartbeat_s``, else a quarter of ``takeover_s`` (at least
        5 s, but at most half of ``takeover_s``)."""
        return self.heartbeat_s or min(max(5.0, self.takeover_s / 4), self.takeover_s / 2)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: journald keeps it, ``jq`` reads it."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str)


def setup_logging(level: int = logging.INFO, stream=sys.stdout) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("edge_agent")
    root.handlers[:] = [handler]
    root.setLevel(level)


def _fields(**kw) -> dict:
    return {"fields": kw}


def _tag_float(v: Version, key: str, default: float) -> float:
    """A number a claim tag holds; ``default`` where it is missing or not a positive number (a
    claim written by an older agent has no ``stale_after_s``)."""
    try:
        value = float(v.tags.get(key, ""))
    except ValueError:
        return default
    return value if value > 0 and value == value else default


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        registry: Registry | None = None,
        reader_factory: Callable[[], power.PowerReader] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.cfg = cfg
        self.registry = registry or Registry(cfg.tracking_uri, cfg.model_name)
        self.outbox = Outbox(cfg.state_dir / "outbox")
        self._reader_factory = reader_factory or (lambda: power.discover(cfg.power_root, cfg.power))
        self._clock = clock  # wall clock: heartbeats are compared across machines
        self._stop = threading.Event()
        self.results: dict[str, Measurement] = {}  # version -> what this agent measured

    # ------------------------------------------------------------------ loop

    def request_stop(self, *_args) -> None:
        """Signal handler: finish cleanly at the next check, handing back an unfinished claim."""
        log.info("stop requested", extra=_fields(agent=self.cfg.agent_id))
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_forever(self) -> None:
        """Poll until stopped; connection errors back off exponentially up to ``max_backoff_s``."""
        try:  # a power source that cannot open fails each measurement with its reason, not the start
            reader = self._reader_factory()
            try:
                found = conditions(self.cfg.power_root, reader)
            finally:
                reader.close()
        except Exception as exc:
            found = {"conditions_unread": f"{type(exc).__name__}: {exc}"[:300]}
        log.info(
            "agent started",
            extra=_fields(
                agent=self.cfg.agent_id,
                device=self.cfg.device,
                tracking_uri=self.cfg.tracking_uri,
                **found,
            ),
        )
        failures = 0
        while not self.stopping:
            try:
                self.poll_once()
                failures = 0
                wait = self.cfg.poll_s
            except Exception as exc:  # the server is down, DNS failed, ...: keep going
                failures += 1
                wait = min(self.cfg.max_backoff_s, self.cfg.poll_s * 2 ** min(failures, 10))
                log.warning("poll failed; backing off", extra=_fields(error=str(exc)[:300], retry_in_s=wait))
            self._stop.wait(wait)
        log.info("agent stopped", extra=_fields(agent=self.cfg.agent_id))

    def poll_once(self) -> list[str]:
        """One pass: flush the outbox, then measure every claimable version. Returns them."""
        self.flush_outbox()
        done = []
        for v in self.registry.versions():
            if self.stopping:
                break
            if self.claimable(v) and self.claim(v.version):
                self.process(v.version)
                done.append(v.version)
        return done

    # ------------------------------------------------------------------ claims

    def claimable(self, v: Version) -> bool:
        if self.outbox.has(v.name, v.version, self.cfg.device):
            return False  # measured already; the report waits for the server
        status = v.status(self.cfg.device)
        if status in (None, contract.PENDING):
            return True
        if status == contract.MEASURING:
            return self._clock() - _tag_float(v, self._tag(contract.TAG_HEARTBEAT), 0.0) > _tag_float(
                v, self._tag(contract.TAG_STALE_AFTER), self.cfg.takeover_s
            )
        return False

    def claim(self, version: str) -> bool:
        fresh = self.registry.get(version)  # the listing may be stale by now
        if not self.claimable(fresh):
            return False
        if fresh.status(self.cfg.device) == contract.MEASURING:
            log.warning(
                "taking over a stale claim",
                extra=_fields(version=version, previous=fresh.tags.get(self._tag(contract.TAG_CLAIMED_BY))),
            )
        tags = {
            self._tag(contract.TAG_CLAIMED_BY): self.cfg.agent_id,
            self._tag(contract.TAG_HEARTBEAT): f"{self._clock():.3f}",
            self._tag(contract.TAG_STALE_AFTER): f"{self.cfg.takeover_s:g}",
            contract.status_tag(self.cfg.device): contract.MEASURING,  # last: a failed claim stays pending
        }
        for key, value in tags.items():
            try:
                self.registry.set_tags(version, {key: value})
            except Exception as exc:
                # MLflow's SQL store looks a tag up, then inserts it: of two agents adding the same new
                # tag at once, one insert is refused (a UNIQUE constraint error). Written again, the tag
                # exists and is updated; the settle-and-re-read below decides the race as usual. A
                # second failure is real (the server is gone): the poll loop's back-off handles it.
                log.info(
                    "claim write refused, writing again", extra=_fields(version=version, error=str(exc)[:200])
                )
                self.registry.set_tags(version, {key: value})
        self._stop.wait(self.cfg.claim_settle_s)
        owner = self.registry.get(version).tags.get(self._tag(contract.TAG_CLAIMED_BY))
        if owner != self.cfg.agent_id:
            log.info("another agent claimed it", extra=_fields(version=version, owner=owner))
            return False
        if self.stopping:  # stopped during the settle: give it back before any download or build
            self.hand_back(version)
            return False
        log.info("claimed", extra=_fields(version=version, device=self.cfg.device))
        return True

    def heartbeat(self, version: str) -> None:
        self.registry.set_tags(version, {self._tag(contract.TAG_HEARTBEAT): f"{self._clock():.3f}"})

    @contextmanager
    def _beating(self, version: str):
        """Refresh the heartbeat while a long step runs (an engine build can take minutes)."""
        done = threading.Event()
        period = self.cfg.heartbeat_period

        def beat():
            while not done.wait(period):
                try:
                    self.heartbeat(version)
                except Exception as exc:  # a missed beat only risks a takeover after takeover_s
                    log.warning("heartbeat failed", extra=_fields(version=version, error=str(exc)[:200]))

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def hand_back(self, version: str) -> None:
        try:
            self.registry.set_tags(version, {contract.status_tag(self.cfg.device): contract.PENDING})
            self.registry.release_claim(version, self.cfg.device)
            log.info("handed the claim back", extra=_fields(version=version))
        except Exception as exc:  # the takeover timeout covers this case
            log.warning("could not hand the claim back", extra=_fields(version=version, error=str(exc)[:300]))

    def _tag(self, name: str) -> str:
        return contract.edge_key(self.cfg.device, name)

    # ------------------------------------------------------------------ one version

    def process(self, version: str) -> Report | None:
        """Measure a claimed version and report. Returns the report (None if handed back)."""
        v = self.registry.get(version)
        report_base = dict(
            result_id=uuid.uuid4().hex,
            model_name=self.cfg.model_name,
            version=version,
            run_id=v.run_id,
            device=self.cfg.device,
            agent_id=self.cfg.agent_id,
        )
        try:
            result = self._measure(v)
        except Interrupted as exc:
            log.info("measurement interrupted", extra=_fields(version=version, reason=str(exc)))
            self.hand_back(version)
            return None
        except Exception as exc:  # whatever it is, it belongs to this candidate's report
            reason = self._reason(exc)
            log.error("measurement failed", extra=_fields(version=version, error=reason[:500]))
            report = Report(
                **report_base, status=contract.FAILED, timestamp_ms=int(self._clock() * 1000), error=reason
            )
        else:
            tags = {contract.TAG_BACKEND: result.backend, contract.TAG_POWER_SOURCE: result.power_source}
            reason = result.info.get(power.UNAVAILABLE_REASON)
            if reason:  # the full reason is in the measurement artifact
                tags[contract.TAG_POWER_NOTE] = _shorten(reason, contract.POWER_NOTE_CHARS)
            report = Report(
                **report_base,
                status=contract.DONE,
                timestamp_ms=int(self._clock() * 1000),
                metrics=result.metrics(),
                tags=tags,
                measurement={**result.to_json(), "protocol": asdict(self.cfg.measure)},
            )
            self.results[version] = result
            log.info("measured", extra=_fields(version=version, **result.metrics()))
            if result.unstable:
                cv, limit = round(result.worst_cv, 4), self.cfg.measure.max_cv
                log.warning(
                    "unstable: its windows varied by more than max_cv twice; reported, never ranked",
                    extra=_fields(version=version, cv=cv, max_cv=limit),
                )
        try:
            self.outbox.put(report)
        except OSError as exc:  # a full disk must not cost the report: send it without a local copy
            log.error(
                "could not keep the report in the outbox; sending it without a copy",
                extra=_fields(version=version, error=self._reason(exc)),
            )
        self._deliver(report)
        return report

    def _reason(self, exc: Exception) -> str:
        """What went wrong, for the report and the log: a file the agent could not write (a full
        disk, a read-only state dir) says what to do; anything else keeps its type and message."""
        if isinstance(exc, OSError) and exc.filename:
            return (
                f"OSError: {exc.strerror or exc} at {exc.filename}; free disk space on the device or make "
                f"the agent's state dir {self.cfg.state_dir} writable"
            )
        return f"{type(exc).__name__}: {exc}"

    def _measure(self, v: Version) -> Measurement:
        expected = v.tags.get(contract.TAG_SHA256)
        if not expected:
            raise ValueError(f"version {v.version} has no {contract.TAG_SHA256} tag; re-register it")
        work = self.cfg.state_dir / "downloads" / f"{v.name}-v{v.version}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            model = self.registry.download_onnx(v.version, work)
            actual = sha256_file(model)
            if actual != expected:
                raise ValueError(
                    f"sha256 mismatch: the registry says {expected[:16]}..., the downloaded file is "
                    f"{actual[:16]}...; the artifact was changed or corrupted after registration"
                )
            precision = self.cfg.precision
            if v.tags.get(contract.TAG_PRECISION) == contract.FP32_ONLY and precision != "fp32":
                # the export found float16 too coarse for this model's quality (model/export.py)
                log.info(
                    "fp32 engine: the export marked this model fp32-only", extra=_fields(version=v.version)
                )
                precision = "fp32"
            self.heartbeat(v.version)
            with self._beating(v.version):
                return measure_file(
                    model,
                    actual,
                    backend=self.cfg.backend,
                    precision=precision,
                    reader=self._reader_factory(),
                    cfg=self.cfg.measure,
                    cache_dir=self.cfg.state_dir / "engines",
                    power_root=self.cfg.power_root,
                    should_stop=lambda: self.stopping,
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ reports

    def _deliver(self, report: Report) -> bool:
        try:
            self.registry.deliver(report)
        except Exception as exc:
            log.warning(
                "report kept in the outbox; the server did not take it",
                extra=_fields(version=report.version, error=str(exc)[:300]),
            )
            return False
        self.outbox.done(report)
        log.info("reported", extra=_fields(version=report.version, status=report.status))
        return True

    def flush_outbox(self) -> int:
        """Deliver stored reports; stop at the first failure (the server is probably still down)."""
        sent = 0
        for report in self.outbox.pending():
            if not self._deliver(report):
                break
            sent += 1
        return sent


# What sets a device's measuring conditions, where readable (every measurement's artifact holds them
# too, with the rest of the device's description)
CONDITIONS = (
    "power_mode",
    "power_mode_id",
    "cpu_governor",
    "power_source",
    "power_rail",
    "ina3221_update_interval_ms",
    "ina3221_samples",
)


def conditions(power_root: Path, reader: power.PowerReader) -> dict[str, str]:
    """The Jetson's power mode (``nvpmodel -q``), the CPU frequency governor, the power source and,
    for an INA3221, its conversion interval and averaging: those found, by name."""
    found = {**collect_device_info(power_root), **reader.describe()}
    return {k: found[k] for k in CONDITIONS if k in found}


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def measure_file(
    model: Path,
    sha256: str,
    *,
    backend: str = "auto",
    precision: str = "fp16",
    reader: power.PowerReader,
    cfg: MeasureConfig,
    cache_dir: Path,
    power_root: Path = Path("/"),
    should_stop: Callable[[], bool] = lambda: False,
) -> Measurement:
    """Measure one ONNX file with the chosen backend (shared by the daemon and ``measure``)."""
    name = backends.resolve_backend(backend)
    info = collect_device_info(power_root)
    try:
        if name == "trtexec":
            return measure_trtexec(
                lambda s: backends.run_trtexec(model, sha256, precision, cache_dir, s, cfg.warmup_s),
                reader,
                cfg,
                info,
                should_stop,
            )
        engine = backends.open_engine(name, model, sha256, precision, cache_dir)
        try:
            return measure_engine(engine, reader, cfg, info, should_stop)
        finally:
            engine.close()
    finally:
        reader.close()
