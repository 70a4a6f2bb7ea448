"""The measurement protocol: warm-up, idle baseline, a fixed-duration loaded window.

DESIGN, "Measuring power on the device": power is sampled in a background thread on a monotonic
clock; the loaded window is seconds long (not a handful of runs) so the sensor's 10-100 Hz rate
resolves it; energy is the trapezoid integral; energy per image is net of the idle power::

    energy_mj_per_image = (mean loaded power - mean idle power) x window_s / images

Latency percentiles come from the per-inference times of the same loaded window. A window with a
gap between power samples longer than ``max_gap_s`` is rejected rather than integrated across.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from edge_agent import contract, power
from edge_agent.backends import Engine, TrtexecRun


class MeasurementError(RuntimeError):
    """The window cannot give a trustworthy figure (sample gaps, too few images, stopped)."""


class Interrupted(MeasurementError):
    """The agent was asked to stop in the middle of a measurement."""


@dataclass(frozen=True)
class MeasureConfig:
    warmup_s: float = 2.0  # first inferences pay for lazy allocation and clock ramp-up
    idle_s: float = 3.0  # idle baseline; the INA3221 needs a few seconds to settle after load
    duration_s: float = 10.0  # loaded window: ~200 samples at 20 Hz
    rate_hz: float = 20.0  # sysfs sampling rate (tegrastats paces itself)
    max_gap_s: float | None = None  # default: 5 sample periods, at least 0.5 s
    min_images: int = 5  # fewer inferences than this in the window cannot give a p99

    def __post_init__(self) -> None:
        for name in ("warmup_s", "idle_s", "duration_s", "rate_hz"):
            if getattr(self, name) < 0 or (name in ("duration_s", "rate_hz") and getattr(self, name) == 0):
                raise ValueError(f"measure setting {name}={getattr(self, name)} must be positive")

    def gap_limit_s(self) -> float:
        return self.max_gap_s if self.max_gap_s is not None else max(0.5, 5.0 / self.rate_hz)


@dataclass(frozen=True)
class Measurement:
    """One measured candidate. Power fields are None when no power source was available."""

    backend: str
    power_source: str
    images: int
    window_s: float
    throughput_ips: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_mean: float
    power_mw: float | None
    idle_power_mw: float | None
    energy_mj_per_image: float | None
    power_samples: int
    # monotonic-clock bounds of the two windows (lets a test integrate what a fake sensor served)
    idle_t0_s: float
    idle_t1_s: float
    loaded_t0_s: float
    loaded_t1_s: float
    info: Mapping[str, str] = field(default_factory=dict)  # device, power mode, clocks, versions

    def metrics(self) -> dict[str, float]:
        """The figures the contract logs (``contract.EDGE_METRICS``), skipping unavailable ones."""
        out = {name: getattr(self, name) for name in contract.EDGE_METRICS}  # fields bear those names
        return {k: float(v) for k, v in out.items() if v is not None}

    def to_json(self) -> dict:
        d = asdict(self)
        d["info"] = dict(self.info)
        return d


def percentiles_ms(times_s: np.ndarray) -> tuple[float, float, float]:
    p50, p90, p99 = np.percentile(times_s * 1e3, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def _window_power(
    samples: list[power.PowerSample], t0: float, t1: float, gap_limit_s: float, what: str
) -> float:
    """Mean power over exactly [t0, t1]; rejects windows with gaps between samples.

    The samples are joined by straight lines (the trapezoid rule) and that curve is integrated
    from t0 to t1, using the samples just outside the window to place its ends, so the result
    does not depend on where the first and last samples fall.
    """
    inside = [s for s in samples if t0 <= s.t_s <= t1]
    if len(inside) < 2:
        raise MeasurementError(
            f"only {len(inside)} power samples in the {t1 - t0:.2f} s {what} window; lengthen the window "
            "or raise the sampling rate"
        )
    edges = [inside[0].t_s - t0, t1 - inside[-1].t_s, power.max_gap_s(inside)]
    if max(edges) > gap_limit_s:
        raise MeasurementError(
            f"the {what} window has a {max(edges):.2f} s gap between power samples "
            f"(limit {gap_limit_s:.2f} s); the sensor stalled or the machine was overloaded: measure again"
        )
    t_all = [s.t_s for s in samples]
    p_all = [s.power_mw for s in samples]

    def at(t: float) -> power.PowerSample:  # beyond the outermost samples np.interp holds their value
        return power.PowerSample(t_s=t, power_mw=float(np.interp(t, t_all, p_all)))

    return power.mean_power_mw([at(t0), *inside, at(t1)])


def _idle(cfg: MeasureConfig, should_stop: Callable[[], bool]) -> tuple[float, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < cfg.idle_s:
        if should_stop():
            raise Interrupted("stopped during the idle window")
        time.sleep(min(0.05, cfg.idle_s))
    return t0, time.monotonic()


def measure_engine(
    engine: Engine,
    reader: power.PowerReader,
    cfg: MeasureConfig = MeasureConfig(),
    info: Mapping[str, str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Measurement:
    """Run the protocol on an engine that times one inference at a time (ONNX Runtime, TensorRT).

    Args:
        engine: built engine with its input bound.
        reader: power source; an unavailable one gives latency only (power fields None).
        cfg: windows and sampling.
        info: device info recorded with the result (power mode, clocks, versions).
        should_stop: polled between inferences; True aborts with ``Interrupted``.
    """
    t_warm, n_warm = time.monotonic(), 0
    while time.monotonic() - t_warm < cfg.warmup_s or n_warm < 3:
        engine.infer()
        n_warm += 1
        if should_stop():
            raise Interrupted("stopped during warm-up")
    sampler = power.Sampler(reader, rate_hz=cfg.rate_hz)
    with sampler:
        idle_t0, idle_t1 = _idle(cfg, should_stop)
        times = []
        loaded_t0 = time.monotonic()
        while True:
            start = time.perf_counter()
            engine.infer()
            times.append(time.perf_counter() - start)
            now = time.monotonic()
            if now - loaded_t0 >= cfg.duration_s:
                break
            if should_stop():
                raise Interrupted("stopped during the loaded window")
        loaded_t1 = now
        samples = sampler.samples_between(idle_t0, loaded_t1)
    if len(times) < cfg.min_images:
        raise MeasurementError(
            f"only {len(times)} inferences fit in the {cfg.duration_s} s window; lengthen --duration-s"
        )
    lat = np.asarray(times)
    p50, p90, p99 = percentiles_ms(lat)
    window_s = loaded_t1 - loaded_t0
    return _result(
        engine.backend,
        reader,
        samples,
        cfg,
        images=len(times),
        window_s=window_s,
        latency=(p50, p90, p99, float(lat.mean() * 1e3)),
        bounds=(idle_t0, idle_t1, loaded_t0, loaded_t1),
        info={**(info or {}), **engine.versions()},
    )


def measure_trtexec(
    run_window: Callable[[float], TrtexecRun],
    reader: power.PowerReader,
    cfg: MeasureConfig = MeasureConfig(),
    info: Mapping[str, str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Measurement:
    """The protocol around trtexec, which times its own loop.

    ``run_window(duration_s)`` runs trtexec for that long. A first short run builds (or loads) the
    engine and warms up; the loaded window is the last ``duration_s`` of the timed run (trtexec
    spends its first moments loading the engine and warming up); energy per image is the net
    power divided by trtexec's throughput.
    """
    run_window(max(1.0, cfg.warmup_s))
    if should_stop():
        raise Interrupted("stopped after the trtexec warm-up")
    sampler = power.Sampler(reader, rate_hz=cfg.rate_hz)
    with sampler:
        idle_t0, idle_t1 = _idle(cfg, should_stop)
        result = run_window(cfg.duration_s)
        samples = sampler.samples_between(idle_t0, result.ended_s)
    loaded_t1 = result.ended_s
    loaded_t0 = max(result.started_s, loaded_t1 - cfg.duration_s)
    lat = result.summary.latency
    pct = lat.percentiles_ms
    p99 = pct.get(99.0)
    if lat.median_ms is None or p99 is None or not result.summary.throughput_qps:
        raise MeasurementError("trtexec's summary lacks the median, the 99th percentile or the throughput")
    images = int(round(result.summary.throughput_qps * (loaded_t1 - loaded_t0)))
    extra = {**(info or {}), "tensorrt_version": result.trt_version}
    mean_ms = lat.mean_ms if lat.mean_ms is not None else lat.median_ms
    return _result(
        "trtexec",
        reader,
        samples,
        cfg,
        images=images,
        window_s=loaded_t1 - loaded_t0,
        latency=(lat.median_ms, pct.get(90.0, p99), p99, mean_ms),
        bounds=(idle_t0, idle_t1, loaded_t0, loaded_t1),
        info=extra,
    )


def _result(
    backend: str,
    reader: power.PowerReader,
    samples: list[power.PowerSample],
    cfg: MeasureConfig,
    images: int,
    window_s: float,
    latency: tuple[float, float, float, float],  # p50, p90, p99, mean in ms
    bounds: tuple[float, float, float, float],
    info: Mapping[str, str],
) -> Measurement:
    idle_t0, idle_t1, loaded_t0, loaded_t1 = bounds
    p50, p90, p99, mean_ms = latency
    busy = idle = energy = None
    if reader.available:
        idle = _window_power(samples, idle_t0, idle_t1, cfg.gap_limit_s(), "idle")
        busy = _window_power(samples, loaded_t0, loaded_t1, cfg.gap_limit_s(), "loaded")
        energy = (busy - idle) * window_s / images  # mW x s = mJ
    return Measurement(
        backend=backend,
        power_source=reader.name,
        images=images,
        window_s=window_s,
        throughput_ips=images / window_s,
        latency_ms_p50=p50,
        latency_ms_p90=p90,
        latency_ms_p99=p99,
        latency_ms_mean=mean_ms,
        power_mw=busy,
        idle_power_mw=idle,
        energy_mj_per_image=energy,
        power_samples=len(samples),
        idle_t0_s=idle_t0,
        idle_t1_s=idle_t1,
        loaded_t0_s=loaded_t0,
        loaded_t1_s=loaded_t1,
        info={**reader.describe(), **{k: str(v) for k, v in info.items()}},
    )
