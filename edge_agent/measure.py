"""The measurement protocol: warm-up, idle baseline, several fixed-duration loaded windows.

Power is sampled in a background thread on a monotonic clock; each loaded window is seconds long
(not a handful of runs) so the sensor's 10-100 Hz rate resolves it; energy is the trapezoid
integral; energy per image is net of the idle power::

    energy_mj_per_image = (mean loaded power - mean idle power) x window_s / images

Latency percentiles come from the per-inference times of each loaded window. A window with a gap
between power samples longer than ``max_gap_s`` is rejected rather than integrated across.

One figure from one window cannot say how far to trust it. So a candidate is measured in
``windows`` loaded windows (``pause_s`` apart, no inference in between); the figures reported are
the means over the windows, beside the spread of the compared ones across windows (standard
deviation and coefficient of variation, std / mean). Where a compared figure's coefficient of
variation exceeds ``max_cv`` (something else loaded the device, the clocks moved) the candidate is
measured once more from its idle baseline; if it is still above, the measurement is kept but
marked ``unstable``, and selection does not rank it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from edge_agent import contract, power
from edge_agent.backends import Engine, TrtexecRun
from edge_agent.errors import UserError

log = logging.getLogger(__name__)


class MeasurementError(UserError, RuntimeError):
    """The window cannot give a trustworthy figure (sample gaps, too few images, stopped)."""


class Interrupted(MeasurementError):
    """The agent was asked to stop in the middle of a measurement."""


@dataclass(frozen=True)
class MeasureConfig:
    warmup_s: float = 2.0  # first inferences pay for lazy allocation and clock ramp-up
    idle_s: float = 3.0  # idle baseline; the INA3221 needs a few seconds to settle after load
    duration_s: float = 4.0  # each loaded window: ~80 samples at 20 Hz
    windows: int = 5  # loaded windows per candidate: the figures are their means
    pause_s: float = 1.0  # between loaded windows, nothing running
    # a compared figure varying more across windows: measured again, then unstable. 0.15: six
    # measurements on a 2-core CPU box, quiet, gave 0.05-0.10, and 0.20-0.23 where one window was
    # disturbed (docs/benchmarks.md, "The agent's windows")
    max_cv: float = 0.15
    rate_hz: float = 20.0  # sysfs sampling rate (tegrastats paces itself)
    max_gap_s: float | None = None  # default: 5 sample periods, at least 0.5 s
    min_images: int = 5  # fewer inferences than this in a window cannot give a p99

    def __post_init__(self) -> None:
        for name in ("warmup_s", "idle_s", "duration_s", "pause_s", "max_cv", "rate_hz"):
            value = getattr(self, name)
            if not value >= 0 or (name in ("duration_s", "max_cv", "rate_hz") and value == 0):
                raise ValueError(f"measure setting {name}={value} must be positive")
        if self.windows < 1:
            raise ValueError(f"measure setting windows={self.windows} must be at least 1")

    def gap_limit_s(self) -> float:
        return self.max_gap_s if self.max_gap_s is not None else max(0.5, 5.0 / self.rate_hz)


@dataclass(frozen=True)
class Window:
    """One loaded window: its bounds on the monotonic clock and what ran in it."""

    t0_s: float
    t1_s: float
    images: int
    latency_ms: tuple[float, float, float, float]  # p50, p90, p99, mean
    power_mw: float | None = None
    energy_mj_per_image: float | None = None


@dataclass(frozen=True)
class Measurement:
    """One measured candidate: the means over its loaded windows, and their spread.

    Power fields are None when no power source was available."""

    backend: str
    power_source: str
    images: int  # over all windows
    window_s: float  # loaded seconds, over all windows
    throughput_ips: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_mean: float
    latency_ms_std: float  # across windows, of each window's mean latency
    latency_cv: float  # latency_ms_std / latency_ms_mean
    power_mw: float | None
    idle_power_mw: float | None
    energy_mj_per_image: float | None
    energy_cv: float | None  # across windows, of each window's energy per image
    power_samples: int
    # monotonic-clock bounds of the idle window and of each loaded one (lets a test integrate what a
    # fake sensor served)
    idle_t0_s: float
    idle_t1_s: float
    windows: tuple[Window, ...]
    attempts: int = 1  # 2: the first attempt varied more than max_cv and was measured again
    unstable: bool = False  # still above max_cv on the second attempt: reported, never ranked
    info: Mapping[str, str] = field(default_factory=dict)  # device, power mode, clocks, versions

    @property
    def loaded_t0_s(self) -> float:
        return self.windows[0].t0_s

    @property
    def loaded_t1_s(self) -> float:
        return self.windows[-1].t1_s

    @property
    def worst_cv(self) -> float:
        """The larger coefficient of variation of the compared figures (latency; energy if measured)."""
        return max(self.latency_cv, self.energy_cv if self.energy_cv is not None else 0.0)

    def metrics(self) -> dict[str, float]:
        """The figures the contract logs (``contract.EDGE_METRICS``), skipping unavailable ones (and an
        infinite coefficient of variation, which ``unstable`` already says)."""
        out = {name: getattr(self, name) for name in contract.EDGE_METRICS}  # fields bear those names
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}

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


def _wait(seconds: float, should_stop: Callable[[], bool], what: str) -> tuple[float, float]:
    """Nothing runs for ``seconds`` (the idle baseline, a pause between windows); its bounds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if should_stop():
            raise Interrupted(f"stopped during {what}")
        time.sleep(min(0.05, seconds))
    return t0, time.monotonic()


def _repeat(attempt: Callable[[], Measurement], cfg: MeasureConfig) -> Measurement:
    """One attempt; a second where the first varied more than ``cfg.max_cv`` across its windows."""
    first = attempt()
    if first.worst_cv <= cfg.max_cv:
        return first
    log.warning(
        "the windows varied by %.1f%% (limit %.1f%%): measuring again", 100 * first.worst_cv, 100 * cfg.max_cv
    )
    second = attempt()
    return replace(second, attempts=2, unstable=second.worst_cv > cfg.max_cv)


def _windows(
    run_window: Callable[[], Window], reader: power.PowerReader, cfg: MeasureConfig, should_stop
) -> tuple[tuple[float, float], list[Window], list[power.PowerSample]]:
    """The idle baseline, then ``cfg.windows`` loaded windows ``cfg.pause_s`` apart, power sampled
    throughout: (idle bounds, windows, samples)."""
    sampler = power.Sampler(reader, rate_hz=cfg.rate_hz)
    with sampler:
        idle = _wait(cfg.idle_s, should_stop, "the idle window")
        windows = []
        for i in range(cfg.windows):
            if i:
                _wait(cfg.pause_s, should_stop, "a pause between loaded windows")
            windows.append(run_window())
        samples = sampler.samples_between(idle[0], windows[-1].t1_s)
    return idle, windows, samples


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

    def loaded_window() -> Window:
        times = []
        t0 = time.monotonic()
        while True:
            start = time.perf_counter()
            engine.infer()
            times.append(time.perf_counter() - start)
            now = time.monotonic()
            if now - t0 >= cfg.duration_s:
                break
            if should_stop():
                raise Interrupted("stopped during a loaded window")
        if len(times) < cfg.min_images:
            raise MeasurementError(
                f"only {len(times)} inferences fit in the {cfg.duration_s} s window; lengthen --duration-s"
            )
        lat = np.asarray(times)
        return Window(t0, now, len(times), (*percentiles_ms(lat), float(lat.mean() * 1e3)))

    def attempt() -> Measurement:
        idle, windows, samples = _windows(loaded_window, reader, cfg, should_stop)
        extra = {**(info or {}), **engine.versions()}
        return _result(engine.backend, reader, samples, cfg, idle, windows, extra)

    return _repeat(attempt, cfg)


def measure_trtexec(
    run_window: Callable[[float], TrtexecRun],
    reader: power.PowerReader,
    cfg: MeasureConfig = MeasureConfig(),
    info: Mapping[str, str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Measurement:
    """The protocol around trtexec, which times its own loop.

    ``run_window(duration_s)`` runs trtexec for that long. A first short run builds (or loads) the
    engine and warms up; each loaded window is the last ``duration_s`` of one timed run (trtexec
    spends its first moments loading the engine and warming up); energy per image is the net
    power divided by trtexec's throughput.
    """
    run_window(max(1.0, cfg.warmup_s))
    if should_stop():
        raise Interrupted("stopped after the trtexec warm-up")
    versions: dict[str, str] = {}

    def loaded_window() -> Window:
        result = run_window(cfg.duration_s)
        versions["tensorrt_version"] = result.trt_version
        t1 = result.ended_s
        t0 = max(result.started_s, t1 - cfg.duration_s)
        lat = result.summary.latency
        pct = lat.percentiles_ms
        p99 = pct.get(99.0)
        if lat.median_ms is None or p99 is None or not result.summary.throughput_qps:
            raise MeasurementError("trtexec's summary lacks the median, 99th percentile or throughput")
        images = int(round(result.summary.throughput_qps * (t1 - t0)))
        mean_ms = lat.mean_ms if lat.mean_ms is not None else lat.median_ms
        if should_stop():
            raise Interrupted("stopped after a trtexec window")
        return Window(t0, t1, images, (lat.median_ms, pct.get(90.0, p99), p99, mean_ms))

    def attempt() -> Measurement:
        idle, windows, samples = _windows(loaded_window, reader, cfg, should_stop)
        return _result("trtexec", reader, samples, cfg, idle, windows, {**(info or {}), **versions})

    return _repeat(attempt, cfg)


def _spread(values: list[float]) -> tuple[float, float, float]:
    """(mean, sample standard deviation, coefficient of variation) of one figure across windows; the
    coefficient is infinite for a mean of zero (a figure that cannot be told from nothing)."""
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return mean, std, std / abs(mean) if mean else (0.0 if std == 0 else math.inf)


def _result(
    backend: str,
    reader: power.PowerReader,
    samples: list[power.PowerSample],
    cfg: MeasureConfig,
    idle_bounds: tuple[float, float],
    windows: list[Window],
    info: Mapping[str, str],
) -> Measurement:
    idle_t0, idle_t1 = idle_bounds
    busy = idle = energy = energy_cv = None
    if reader.available:
        idle = _window_power(samples, idle_t0, idle_t1, cfg.gap_limit_s(), "idle")
        powered = []
        for w in windows:
            mw = _window_power(samples, w.t0_s, w.t1_s, cfg.gap_limit_s(), "loaded")
            net_mj = (mw - idle) * (w.t1_s - w.t0_s)  # mW x s = mJ
            powered.append(replace(w, power_mw=mw, energy_mj_per_image=net_mj / w.images))
        windows = powered
        busy = float(np.mean([w.power_mw for w in windows]))
        energy, _, energy_cv = _spread([w.energy_mj_per_image for w in windows])
    p50, p90, p99, mean_ms = (float(x) for x in np.mean([w.latency_ms for w in windows], axis=0))
    _, latency_std, latency_cv = _spread([w.latency_ms[3] for w in windows])
    images = sum(w.images for w in windows)
    window_s = sum(w.t1_s - w.t0_s for w in windows)
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
        latency_ms_std=latency_std,
        latency_cv=latency_cv,
        power_mw=busy,
        idle_power_mw=idle,
        energy_mj_per_image=energy,
        energy_cv=energy_cv,
        power_samples=len(samples),
        idle_t0_s=idle_t0,
        idle_t1_s=idle_t1,
        windows=tuple(windows),
        info={**reader.describe(), **{k: str(v) for k, v in info.items()}},
    )
