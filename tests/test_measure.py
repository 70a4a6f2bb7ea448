"""The measurement protocol's windows: figures are their means, a spread above the limit is
measured again once, and what stays above is marked unstable (edge_agent/measure.py)."""

from __future__ import annotations

import math
import time

import pytest

from edge_agent import power
from edge_agent.measure import MeasureConfig, _spread, measure_engine


class WindowedEngine:
    """Sleeps ``delays_s[k]`` per inference in its k-th loaded window; a new window is told by a
    gap of at least ``gap_s`` since the last inference (the idle baseline, a pause)."""

    backend, input_shape = "fake", (1,)

    def __init__(self, delays_s: list[float], gap_s: float):
        self.delays_s, self.gap_s = delays_s, gap_s
        self.window, self.last = -1, None
        self.per_window: list[int] = []  # inferences run in each window

    def infer(self):
        now = time.monotonic()
        if self.last is None or now - self.last >= self.gap_s:
            self.window += 1
            self.per_window.append(0)
        self.per_window[-1] += 1
        time.sleep(self.delays_s[min(self.window, len(self.delays_s) - 1)])
        self.last = time.monotonic()

    def versions(self):
        return {"fake_version": "1"}

    def close(self):
        pass


# warm-up, idle 0.15 s, windows of 0.1 s 0.15 s apart: the engine's window 0 is the warm-up
CFG = MeasureConfig(warmup_s=0.02, idle_s=0.15, duration_s=0.1, windows=3, pause_s=0.15, max_cv=0.3)


def test_the_figures_are_the_means_over_the_windows():
    engine = WindowedEngine([0.002], gap_s=0.1)
    m = measure_engine(engine, power.UnavailableReader("none here"), CFG)
    assert len(m.windows) == 3 and m.attempts == 1 and not m.unstable
    assert engine.per_window[1:] == [w.images for w in m.windows]  # one engine window per loaded one
    assert m.images == sum(w.images for w in m.windows)
    assert m.window_s == pytest.approx(sum(w.t1_s - w.t0_s for w in m.windows))
    for i, name in enumerate(("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean")):
        assert getattr(m, name) == pytest.approx(sum(w.latency_ms[i] for w in m.windows) / 3)
    means = [w.latency_ms[3] for w in m.windows]
    mean = sum(means) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in means) / 2)  # the sample standard deviation
    assert m.latency_ms_std == pytest.approx(std) and m.latency_cv == pytest.approx(std / mean)
    assert m.latency_ms_mean >= 2.0  # each inference sleeps 2 ms
    for a, b in zip(m.windows, m.windows[1:]):  # a pause between windows
        assert b.t0_s - a.t1_s >= CFG.pause_s
    assert m.energy_cv is None and m.metrics()["unstable"] == 0.0
    assert {"latency_ms_mean", "latency_ms_std", "latency_cv"} <= set(
        m.metrics()
    ) and "energy_cv" not in m.metrics()


def test_a_spread_above_the_limit_is_measured_again_once_then_marked_unstable():
    # windows of 2, 8, 2 ms inferences: a coefficient of variation near 0.8, twice
    engine = WindowedEngine([0.002, 0.002, 0.008, 0.002, 0.002, 0.008, 0.002], gap_s=0.1)
    m = measure_engine(engine, power.UnavailableReader("none here"), CFG)
    assert m.attempts == 2 and m.unstable and m.latency_cv > CFG.max_cv
    assert len(engine.per_window) == 1 + 2 * CFG.windows  # warm-up, then two attempts' windows
    assert m.metrics()["unstable"] == 1.0


def test_a_second_attempt_within_the_limit_is_kept_and_not_marked():
    engine = WindowedEngine([0.002, 0.002, 0.008, 0.002, 0.003], gap_s=0.1)
    m = measure_engine(engine, power.UnavailableReader("none here"), CFG)
    assert m.attempts == 2 and not m.unstable and m.latency_cv <= CFG.max_cv
    assert m.latency_ms_mean >= 3.0  # the second attempt's figures: every window at 3 ms


def test_one_window_has_no_spread_and_a_zero_mean_an_infinite_one():
    assert _spread([4.0]) == (4.0, 0.0, 0.0)
    mean, std, cv = _spread([1.0, 3.0])
    assert (mean, cv) == (2.0, pytest.approx(std / 2.0)) and std == pytest.approx(math.sqrt(2))
    assert _spread([-1.0, 1.0])[2] == math.inf  # energy that cannot be told from idle
    assert _spread([0.0, 0.0])[2] == 0.0


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(windows=0), "windows=0"),
        (dict(max_cv=0.0), "max_cv=0.0"),
        (dict(pause_s=-1.0), "pause_s=-1.0"),
        (dict(duration_s=float("nan")), "duration_s=nan"),
    ],
)
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        MeasureConfig(**bad)
