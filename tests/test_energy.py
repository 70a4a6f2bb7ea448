"""The NVML energy meter, against a fake NVML whose power follows a known curve.

The meter samples and integrates with edge_agent.power (its trapezoid rule: test_edge_power.py)."""

import time

import pytest

from trainers.energy import EnergyMeter


class FakeNVML:
    """Power ramps linearly from 100 W at start, +50 W per second (mW through the NVML API)."""

    def __init__(self, fail_power=False, fail_after=None):
        self.fail_power, self.t0, self.calls, self.shutdown = fail_power, None, 0, False
        self.fail_after = fail_after  # calls that answer before the sensor stops
        self.served = []  # times (s since init) at which power was read

    def nvmlInit(self):
        self.t0 = time.monotonic()

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetPowerUsage(self, handle):
        if self.fail_power:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        self.calls += 1
        t = time.monotonic() - self.t0
        self.served.append(t)
        return 1000 * (100 + 50 * t)

    def nvmlShutdown(self):
        self.shutdown = True


def test_integrates_the_served_power():
    nvml = FakeNVML()
    with EnergyMeter(interval_s=0.01, nvml=nvml) as meter:
        # long enough that a few ms of preemption at the first or last sample stays well under 1%
        time.sleep(1.5)
    r = meter.reading
    assert r.available and r.source == "nvml:Fake GPU" and nvml.shutdown
    assert r.n_samples >= 10 and nvml.calls == r.n_samples + 1  # + the probe when opening
    # the exact integral of what the fake served, between its first and last reading
    a, b = nvml.served[1], nvml.served[-1]
    exact = 100 * (b - a) + 25 * (b**2 - a**2)
    assert r.energy_j == pytest.approx(exact, rel=0.01)
    assert r.mean_power_w == pytest.approx(exact / (b - a), rel=0.01)
    assert r.metrics() == {"train_energy_j": r.energy_j, "train_mean_power_w": r.mean_power_w}


def test_a_sensor_that_stops_ends_the_series_not_the_training():
    nvml = FakeNVML(fail_after=6)  # the probe and five samples
    with EnergyMeter(interval_s=0.01, nvml=nvml) as meter:
        time.sleep(0.3)
    r = meter.reading
    assert r.available and r.n_samples == 5 and nvml.shutdown
    assert "sampling stopped" in r.reason and "GPU_IS_LOST" in r.reason
    a, b = nvml.served[1], nvml.served[5]
    assert r.energy_j == pytest.approx(100 * (b - a) + 25 * (b**2 - a**2), rel=0.05)


def test_unavailable_sensor_reports_no_number():
    with EnergyMeter(nvml=FakeNVML(fail_power=True)) as meter:
        pass
    r = meter.reading
    assert not r.available and r.energy_j is None and r.mean_power_w is None
    assert "NOT_SUPPORTED" in r.reason and r.metrics() == {}


def test_missing_pynvml_is_unavailable(monkeypatch):
    import trainers.energy as energy

    def no_module():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(energy, "_load_nvml", no_module)
    with EnergyMeter() as meter:
        pass
    assert not meter.reading.available and "pynvml" in meter.reading.reason
