"""Power readers against fake sysfs trees, fake NVML and recorded tegrastats; the sampler and integrals."""

import logging
import sys
import time
import types
from pathlib import Path

import pytest

from edge_agent import power
from edge_agent.power import (
    Ina3221Reader,
    NvmlReader,
    PowerReadError,
    PowerSample,
    RaplReader,
    Sampler,
    TegrastatsReader,
    UnavailableReader,
    discover,
    max_gap_s,
    mean_power_mw,
    trapezoid_mj,
)

from conftest import SHARED

TEGRASTATS = (SHARED / "fixtures" / "tegrastats-orin.txt").read_text().splitlines()
NO_TEGRASTATS = ["no-such-tegrastats-for-tests"]  # keeps discover() from finding a real one

# Orin Nano's INA3221 channels; the fourth, unconnected, is there to be skipped.
ORIN_RAILS = {1: ("VDD_IN", 5088, 895), 2: ("VDD_CPU_GPU_CV", 5080, 95), 3: ("VDD_SOC", 5080, 285)}


def make_ina3221(root: Path, chip="1-0040", hwmon="hwmon3", rails=None, nc=(4,)) -> Path:
    """A fake hwmon directory: in{N}_label, in{N}_input (mV), curr{N}_input (mA)."""
    d = root / "sys/bus/i2c/drivers/ina3221" / chip / "hwmon" / hwmon
    d.mkdir(parents=True)
    for n, (label, mv, ma) in (rails or ORIN_RAILS).items():
        (d / f"in{n}_label").write_text(label + "\n")
        set_channel(d, n, mv, ma)
    for n in nc:
        (d / f"in{n}_label").write_text("NC\n")
        set_channel(d, n, 0, 0)
    return d


def set_channel(hwmon: Path, n: int, mv: int, ma: int) -> None:
    (hwmon / f"in{n}_input").write_text(f"{mv}\n")
    (hwmon / f"curr{n}_input").write_text(f"{ma}\n")


def make_rapl(root: Path, packages: dict[int, int], max_uj: int = 10_000_000) -> Path:
    base = root / "sys/class/powercap"
    for pkg, energy in packages.items():
        d = base / f"intel-rapl:{pkg}"
        d.mkdir(parents=True)
        (d / "name").write_text(f"package-{pkg}\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
        sub = base / f"intel-rapl:{pkg}:0"  # a core sub-domain: inside the package, must not be added
        sub.mkdir()
        (sub / "name").write_text("core\n")
        (sub / "energy_uj").write_text("123456789\n")
        (sub / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return base


def fake_nvml(fail_init: bool = False, powers_mw=(15000, 15500)):
    class NVMLError(Exception):
        pass

    readings = iter(powers_mw)
    calls = []

    def init():
        calls.append("init")
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    return types.SimpleNamespace(
        NVMLError=NVMLError,
        calls=calls,
        nvmlInit=init,
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetPowerUsage=lambda h: next(readings),
        nvmlDeviceGetName=lambda h: b"NVIDIA Fake GPU",
        nvmlShutdown=lambda: calls.append("shutdown"),
    )


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def monotonic(self) -> float:
        return self.t


# ---------------------------------------------------------------- INA3221


def test_ina3221_power_is_volts_times_amps_and_changes_between_reads(tmp_path):
    hwmon = make_ina3221(tmp_path)
    reader = Ina3221Reader(tmp_path)
    assert reader.available and not reader.self_paced
    assert reader.describe() == {
        "power_source": "ina3221",
        "rails": "VDD_IN,VDD_CPU_GPU_CV,VDD_SOC",  # NC skipped
        "power_rail": "VDD_IN",
    }
    first = reader.read()
    assert first.power_mw == 5088 * 895 / 1000
    assert dict(first.rails_mw) == {"VDD_IN": 4553.76, "VDD_CPU_GPU_CV": 482.6, "VDD_SOC": 1447.8}
    set_channel(hwmon, 1, 5040, 3560)  # the GPU got busy
    second = reader.read()
    assert second.power_mw == 5040 * 3560 / 1000
    assert second.t_s >= first.t_s
    hash(second)  # samples are hashable (rails as a tuple)


def test_ina3221_explicit_rail_and_unknown_rail(tmp_path):
    make_ina3221(tmp_path)
    assert Ina3221Reader(tmp_path, rail="VDD_SOC").read().power_mw == 5080 * 285 / 1000
    with pytest.raises(PowerReadError, match="'VDD_GPU' is not among the INA3221 rails found"):
        Ina3221Reader(tmp_path, rail="VDD_GPU")


def test_ina3221_without_input_rail_sums_and_says_so(tmp_path):
    make_ina3221(tmp_path, rails={1: ("VDD_GPU", 5000, 100), 2: ("VDD_CPU", 5000, 200)}, nc=())
    reader = Ina3221Reader(tmp_path)
    assert reader.read().power_mw == 500.0 + 1000.0
    assert reader.describe()["power_rail"].startswith("sum(VDD_GPU,VDD_CPU)")


def test_ina3221_prefers_a_rail_named_in_when_there_is_no_vdd_in(tmp_path):
    make_ina3221(tmp_path, rails={1: ("VDD_GPU", 5000, 100), 2: ("POM_5V_IN", 5000, 800)}, nc=())
    assert Ina3221Reader(tmp_path).read().power_mw == 4000.0


def test_ina3221_globs_chips_and_hwmon_numbers(tmp_path):
    first = make_ina3221(tmp_path, chip="1-0040", hwmon="hwmon7")
    second = make_ina3221(
        tmp_path, chip="1-0041", hwmon="hwmon2", rails={1: ("VDD_DDR", 1100, 300)}, nc=(2, 3)
    )
    reader = Ina3221Reader(tmp_path)
    assert [c.rail for c in reader.channels] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC", "VDD_DDR"]
    assert dict(reader.read().rails_mw)["VDD_DDR"] == 330.0
    # what sets the sensor's averaging, where the driver shows it: per chip when there are several
    assert "ina3221_update_interval_ms" not in reader.describe()
    for hwmon, interval in ((first, "1"), (second, "4")):
        (hwmon / "update_interval").write_text(interval + "\n")
        (hwmon / "samples").write_text("4\n")
    described = reader.describe()
    assert described["ina3221_update_interval_ms"] == "1-0040=1,1-0041=4"
    assert described["ina3221_samples"] == "1-0040=4,1-0041=4"
    (second / "update_interval").unlink()
    assert reader.describe()["ina3221_update_interval_ms"] == "1"


def test_ina3221_rail_with_missing_files_is_skipped_at_discovery(tmp_path, caplog):
    hwmon = make_ina3221(tmp_path)
    (hwmon / "curr2_input").unlink()
    with caplog.at_level(logging.WARNING, logger="edge_agent.power"):
        reader = Ina3221Reader(tmp_path)
    assert [c.rail for c in reader.channels] == ["VDD_IN", "VDD_SOC"]
    assert "VDD_CPU_GPU_CV" in caplog.text and "curr2_input" in caplog.text
    assert reader.read().power_mw == 5088 * 895 / 1000


def test_ina3221_rail_vanishing_after_discovery_raises_naming_the_file(tmp_path):
    hwmon = make_ina3221(tmp_path)
    reader = Ina3221Reader(tmp_path)
    (hwmon / "in3_input").unlink()
    with pytest.raises(PowerReadError, match=str(hwmon / "in3_input")):
        reader.read()


def test_ina3221_absent_is_unavailable(tmp_path):
    reader = Ina3221Reader(tmp_path)
    assert not reader.available and reader.read() is None
    assert "ina3221" in reader.reason


# ---------------------------------------------------------------- tegrastats


def test_tegrastats_replays_recorded_lines_then_runs_out():
    reader = TegrastatsReader(lines=TEGRASTATS)
    assert reader.available and reader.self_paced
    a, b = reader.read(), reader.read()
    assert (a.power_mw, b.power_mw) == (4556.0, 17946.0)  # VDD_IN, instant (not the running average)
    assert b.rails_mw == (("VDD_IN", 17946.0), ("VDD_CPU_GPU_CV", 8896.0), ("VDD_SOC", 3923.0))
    assert reader.describe()["power_rail"] == "VDD_IN"
    assert reader.read() is None and not reader.available


def test_tegrastats_skips_a_line_it_cannot_parse(caplog):
    reader = TegrastatsReader(lines=["NvPModel warning: something", TEGRASTATS[0]])
    with caplog.at_level(logging.WARNING, logger="edge_agent.power"):
        assert reader.read() is None
    assert "NvPModel warning" in caplog.text
    assert reader.read().power_mw == 4556.0


def test_tegrastats_subprocess_lines_and_exit_status():
    lines = f"print({TEGRASTATS[0]!r}); print({TEGRASTATS[1]!r})"
    script = f"import sys; {lines}; sys.stderr.write('boom'); sys.exit(3)"
    reader = TegrastatsReader(command=[sys.executable, "-u", "-c", script])
    try:
        assert reader.read().power_mw == 4556.0
        assert reader.read().power_mw == 17946.0
        with pytest.raises(PowerReadError, match="exited with code 3: boom"):
            reader.read()
    finally:
        reader.close()


def test_tegrastats_close_terminates_the_process():
    script = f"import time; print({TEGRASTATS[0]!r}); time.sleep(60)"
    reader = TegrastatsReader(command=[sys.executable, "-u", "-c", script])
    assert reader.read().power_mw == 4556.0
    reader.close()
    assert reader._proc.poll() is not None


def test_tegrastats_missing_binary_is_unavailable():
    reader = TegrastatsReader(command=NO_TEGRASTATS)
    assert not reader.available and reader.read() is None
    assert "not on PATH" in reader.reason


# ---------------------------------------------------------------- NVML


def test_nvml_with_a_fake_module():
    nvml = fake_nvml()
    reader = NvmlReader(nvml_module=nvml)
    assert reader.available
    assert reader.describe()["gpu"] == "NVIDIA Fake GPU"
    # the first reading was spent checking the GPU reports power at all
    sample = reader.read()
    assert sample.power_mw == 15500.0 and sample.rails_mw == (("board", 15500.0),)
    with pytest.raises(PowerReadError, match="NVML power reading of GPU 0 failed"):
        reader.read()  # the fake ran out of readings: StopIteration stands in for an NVMLError
    reader.close()
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_without_driver_is_unavailable():
    reader = NvmlReader(nvml_module=fake_nvml(fail_init=True))
    assert not reader.available and reader.read() is None
    assert "Driver Not Loaded" in reader.reason


# ---------------------------------------------------------------- RAPL


def test_rapl_counter_difference_and_wrap_around(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(power, "time", clock)  # only this module's clock
    base = make_rapl(tmp_path, {0: 1_000_000, 1: 0})
    reader = RaplReader(tmp_path)
    assert [d.name for d in reader.domains] == ["package-0", "package-1"]  # intel-rapl:0:0 left out
    assert reader.read() is None  # primes the counters

    clock.t += 1.0
    (base / "intel-rapl:0/energy_uj").write_text("3000000\n")  # 2 J in 1 s
    (base / "intel-rapl:1/energy_uj").write_text("500000\n")  # 0.5 J in 1 s
    sample = reader.read()
    assert sample.rails_mw == (("package-0", 2000.0), ("package-1", 500.0))
    assert sample.power_mw == 2500.0 and sample.t_s == 101.0

    clock.t += 1.5
    (base / "intel-rapl:0/energy_uj").write_text("1500000\n")  # wrapped at 10 J: 7 + 1.5 = 8.5 J
    (base / "intel-rapl:1/energy_uj").write_text("1250000\n")
    sample = reader.read()
    assert sample.rails_mw == (("package-0", 8_500_000 / 1.5 / 1000), ("package-1", 500.0))


def test_rapl_unreadable_counter_is_unavailable(tmp_path):
    base = make_rapl(tmp_path, {0: 1})
    (base / "intel-rapl:0/energy_uj").unlink()
    (base / "intel-rapl:0/energy_uj").mkdir()  # unreadable even for root, unlike chmod 000
    reader = RaplReader(tmp_path)
    assert not reader.available and "not readable" in reader.reason


# ---------------------------------------------------------------- discover


def test_discover_order(tmp_path, caplog):
    make_rapl(tmp_path, {0: 1})
    kw = dict(tegrastats_command=NO_TEGRASTATS, nvml_module=fake_nvml(fail_init=True))
    assert isinstance(discover(tmp_path, **kw), RaplReader)
    assert isinstance(
        discover(tmp_path, tegrastats_command=NO_TEGRASTATS, nvml_module=fake_nvml()), NvmlReader
    )
    make_ina3221(tmp_path)
    with caplog.at_level(logging.INFO, logger="edge_agent.power"):
        reader = discover(tmp_path, **kw)
    assert isinstance(reader, Ina3221Reader)
    assert caplog.text.count("power source: ina3221") == 1


def test_discover_nothing_found_says_what_was_tried(tmp_path):
    reader = discover(tmp_path, tegrastats_command=NO_TEGRASTATS, nvml_module=fake_nvml(fail_init=True))
    assert isinstance(reader, UnavailableReader) and not reader.available
    for source in ("ina3221", "tegrastats", "nvml", "rapl"):
        assert source in reader.describe()["power_unavailable_reason"]


def test_discover_explicit_source_must_exist(tmp_path):
    make_ina3221(tmp_path)
    with pytest.raises(PowerReadError, match=r"'rapl' was asked for .*sys/class/powercap"):
        discover(tmp_path, prefer="rapl")
    assert isinstance(discover(tmp_path, prefer="none"), UnavailableReader)
    assert isinstance(discover(tmp_path, prefer="ina3221"), Ina3221Reader)
    with pytest.raises(ValueError, match="unknown power source 'jtop'"):
        discover(tmp_path, prefer="jtop")


# ---------------------------------------------------------------- sampler


class LinearReader:
    """power = 1000 + 500 t (t in s since construction): the trapezoid rule is exact for it."""

    name = "linear"
    available = True
    self_paced = False

    def __init__(self):
        self.t0 = time.monotonic()

    def read(self):
        t = time.monotonic()
        return PowerSample(t, 1000.0 + 500.0 * (t - self.t0))

    def close(self):
        pass

    def describe(self):
        return {"power_source": self.name}


def test_sampler_energy_matches_the_exact_integral():
    reader = LinearReader()
    with Sampler(reader, rate_hz=100) as sampler:
        time.sleep(0.3)
    samples = sampler.stop()
    a, b = samples[0].t_s - reader.t0, samples[-1].t_s - reader.t0
    exact_mj = 1000.0 * (b - a) + 250.0 * (b * b - a * a)
    assert trapezoid_mj(samples) == pytest.approx(exact_mj, rel=1e-9)
    assert mean_power_mw(samples) == pytest.approx(exact_mj / (b - a), rel=1e-9)


def test_sampler_rate_and_window():
    sampler = Sampler(LinearReader(), rate_hz=20).start()
    t0 = sampler.mark()
    time.sleep(0.5)
    t1 = sampler.mark()
    time.sleep(0.1)
    samples = sampler.stop()
    window = sampler.samples_between(t0, t1)
    assert 5 <= len(window) <= 15  # about 10: generous, a loaded CI machine may be slow
    assert all(t0 <= s.t_s <= t1 for s in window)
    assert len(samples) > len(window)
    assert all(a.t_s < b.t_s for a, b in zip(samples, samples[1:]))


def test_sampler_self_paced_reader_does_not_sleep():
    reader = TegrastatsReader(lines=TEGRASTATS * 50)
    sampler = Sampler(reader, rate_hz=0.01).start()  # a 100 s period would be seen if it slept
    deadline = time.monotonic() + 10
    while reader.available and time.monotonic() < deadline:
        time.sleep(0.01)
    samples = sampler.stop()
    assert [s.power_mw for s in samples] == [4556.0, 17946.0] * 50


def test_sampler_reraises_a_reader_failure():
    class Failing(LinearReader):
        calls = 0

        def read(self):
            self.calls += 1
            if self.calls == 3:
                raise OSError("i2c bus timeout")
            return super().read()

    sampler = Sampler(Failing(), rate_hz=200).start()
    time.sleep(0.2)
    with pytest.raises(PowerReadError, match="i2c bus timeout"):
        sampler.samples_between(0.0, sampler.mark())
    with pytest.raises(PowerReadError, match="linear power reader failed"):
        sampler.stop()
    kept = sampler.stop(raise_failure=False)  # what was taken before the failure, for who can use it
    assert len(kept) == 2 and "i2c bus timeout" in str(sampler.failure)


def test_sampler_with_unavailable_reader_returns_nothing():
    with Sampler(UnavailableReader("no sensor")) as sampler:
        assert sampler._thread is None
        assert sampler.samples_between(0.0, sampler.mark()) == []
    assert sampler.stop() == []


# ---------------------------------------------------------------- integrals


def test_integrals_on_uneven_samples():
    samples = [PowerSample(0.0, 0.0), PowerSample(1.0, 2000.0), PowerSample(3.0, 2000.0)]
    assert trapezoid_mj(samples) == 1000.0 + 4000.0  # mW x s = mJ
    assert mean_power_mw(samples) == 5000.0 / 3.0  # time-weighted, not the plain mean (1333.3)
    assert max_gap_s(samples) == 2.0
    assert trapezoid_mj(samples[:1]) == 0.0 and max_gap_s(samples[:1]) == float("inf")
    assert mean_power_mw(samples[:1]) == 0.0
    with pytest.raises(ValueError, match="no power samples"):
        mean_power_mw([])
    by_hand = [PowerSample(0, 10), PowerSample(1, 20), PowerSample(3, 20)]  # mW over s: 15 + 40 mJ
    assert trapezoid_mj(by_hand) == pytest.approx(15 + 40)


def test_the_agent_names_its_measuring_conditions(tmp_path):
    """At start the agent logs the power mode, the CPU governor and the INA3221's averaging."""
    from edge_agent.agent import conditions

    hwmon = make_ina3221(tmp_path)
    (hwmon / "update_interval").write_text("1\n")
    (hwmon / "samples").write_text("16\n")
    governor = tmp_path / "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"
    governor.parent.mkdir(parents=True)
    governor.write_text("performance\n")
    found = conditions(tmp_path, Ina3221Reader(tmp_path))
    assert found == {
        "cpu_governor": "performance",
        "power_source": "ina3221",
        "power_rail": "VDD_IN",
        "ina3221_update_interval_ms": "1",
        "ina3221_samples": "16",
    }  # no nvpmodel here: no power mode, never guessed
