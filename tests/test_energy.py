"""The NVML energy meter, against a fake NVML whose power follows a known curve."""

import time

import pytest

from trainers.energy import EnergyMeter, trapezoid_j


class FakeNVML:
    """Power ramps linearly from 100 W at start, +50 W per second (mW through the NVML API)."""

    def __init__(self, fail_power=False):
        self.fail_power, self.t0, self.calls, self.shutdown = fail_power, None, 0, False
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
        self.calls += 1
        t = time.monotonic() - self.t0
        self.served.append(t)
        return 1000 * (100 + 50 * t)

    def nvmlShutdown(self):
        self.shutdown = True


def test_trapezoid_by_hand():
    assert trapezoid_j([0, 1, 3], [10, 20, 20]) == pytest.approx(15 + 40)
    assert trapezoid_j([0], [5]) == 0


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
