"""Power readers behind one protocol, a background sampler, and the integrals over its samples.

On a Jetson the figure is the module input rail ``VDD_IN`` (module power; the sensors do not see
the carrier board), read from the INA3221 hwmon driver, with ``tegrastats`` as the fallback. NVML
(discrete NVIDIA GPUs) and RAPL (x86 packages) let the same code run on a workstation. Every reader
takes an injectable root path (or module / recorded lines) so tests run it against a fake ``/sys``.

Only the standard library is imported here; ``pynvml`` is imported when an NVML reader is built.
"""

from __future__ import annotations

import bisect
import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_agent.errors import UserError
from edge_agent.parsers import ParseError, parse_tegrastats

log = logging.getLogger("edge_agent.power")

SOURCES = ("ina3221", "tegrastats", "nvml", "rapl")  # the order discover() tries them in
UNAVAILABLE_REASON = "power_unavailable_reason"  # describe()'s key for why there is no source


class PowerReadError(UserError, RuntimeError):
    """A power source that was found failed to give a reading, or an explicit source is missing."""


@dataclass(frozen=True)
class PowerSample:
    t_s: float  # time.monotonic() when the value was read
    power_mw: float  # module input rail (Jetson VDD_IN), package total (RAPL) or board (NVML)
    rails_mw: tuple[tuple[str, float], ...] = ()  # every rail read, as (name, mW); a tuple so it hashes


class PowerReader(Protocol):
    name: str  # "ina3221", "tegrastats", "nvml", "rapl" or "unavailable"
    available: bool
    self_paced: bool  # read() blocks until the source has a new value, so the sampler must not sleep

    def read(self) -> PowerSample | None:
        """The current power, or None when there is no value this time (e.g. a counter being primed)."""
        ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, str]:
        """What was found, as string tags, e.g. {"power_source": "ina3221", "power_rail": "VDD_IN"}."""
        ...


def _pick_input_rail(names: Sequence[str]) -> str | None:
    """The module input rail: VDD_IN, else the first whose name contains IN (POM_5V_IN, VIN_SYS_5V0)."""
    if "VDD_IN" in names:
        return "VDD_IN"
    return next((n for n in names if "IN" in n.upper()), None)


class UnavailableReader:
    """No power source: every read is None, and the reason says what was looked for."""

    name = "unavailable"
    available = False
    self_paced = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def read(self) -> PowerSample | None:
        return None

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, str]:
        return {"power_source": "unavailable", UNAVAILABLE_REASON: self.reason}


@dataclass(frozen=True)
class _Ina3221Channel:
    rail: str
    voltage_file: Path  # in{N}_input, mV
    current_file: Path  # curr{N}_input, mA


class Ina3221Reader:
    """Rails of the INA3221 monitor(s) through the hwmon driver: power = V x I per channel.

    Args:
        root: filesystem root to look under (a fake tree in tests).
        rail: the rail to report as ``power_mw``; default VDD_IN, else a rail named *IN*, else the
            sum of all rails.
    """

    name = "ina3221"
    self_paced = False
    GLOB = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"  # the hwmon number varies between boots

    def __init__(self, root: Path = Path("/"), rail: str | None = None) -> None:
        self.root = Path(root)
        self.channels: list[_Ina3221Channel] = []
        self.hwmons = sorted(self.root.glob(self.GLOB))
        for hwmon in self.hwmons:
            self.channels.extend(self._channels(hwmon))
        rails = [c.rail for c in self.channels]
        self.available = bool(rails)
        self.reason = "" if rails else f"no INA3221 channel under {self.root / self.GLOB}"
        if rail is not None and rails and rail not in rails:
            raise PowerReadError(
                f"rail {rail!r} is not among the INA3221 rails found ({', '.join(rails)}); "
                "pass one of those, or none to use VDD_IN."
            )
        self.rail = rail or _pick_input_rail(rails)  # None: report the sum of all rails

    def _channels(self, hwmon: Path) -> Iterator[_Ina3221Channel]:
        chip = hwmon.parent.parent.name  # e.g. 1-0040
        labels = sorted(hwmon.glob("in*_label"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        for label_file in labels:
            n = re.sub(r"\D", "", label_file.name)
            try:
                label = label_file.read_text().strip()
            except OSError as err:
                log.warning("skipping INA3221 channel %s: %s", label_file, err)
                continue
            if not label or label.upper() == "NC":  # NC: nothing connected to this channel on this board
                continue
            channel = _Ina3221Channel(label, hwmon / f"in{n}_input", hwmon / f"curr{n}_input")
            missing = [p.name for p in (channel.voltage_file, channel.current_file) if not p.is_file()]
            if missing:
                log.warning("skipping INA3221 rail %s on %s: %s missing", label, chip, " and ".join(missing))
                continue
            if any(c.rail == label for c in self.channels):  # a second chip reusing a label
                channel = _Ina3221Channel(f"{label}@{chip}", channel.voltage_file, channel.current_file)
            yield channel

    def read(self) -> PowerSample | None:
        if not self.available:
            return None
        t_s = time.monotonic()
        rails = tuple(
            (c.rail, _read_number(c.voltage_file) * _read_number(c.current_file) / 1000.0)
            for c in self.channels
        )
        power = dict(rails)[self.rail] if self.rail else sum(p for _, p in rails)
        return PowerSample(t_s, power, rails)

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, str]:
        """Rails, the rail reported, and what sets the sensor's own averaging where readable: the
        driver's ``update_interval`` (ms between conversions) and ``samples`` (averaged per value),
        one value per chip as ``chip=value`` where there are several chips."""
        rails = ",".join(c.rail for c in self.channels)
        out = {
            "power_source": self.name,
            "rails": rails,
            "power_rail": self.rail or f"sum({rails}) (no input rail found)",
        }
        for attribute, key in (
            ("update_interval", "ina3221_update_interval_ms"),
            ("samples", "ina3221_samples"),
        ):
            values = {}
            for hwmon in self.hwmons:
                try:
                    values[hwmon.parent.parent.name] = (hwmon / attribute).read_text().strip()
                except OSError:
                    continue
            if len(values) == 1:
                out[key] = next(iter(values.values()))
            elif values:
                out[key] = ",".join(f"{chip}={v}" for chip, v in values.items())
        return out


def _read_number(path: Path) -> float:
    try:
        with open(path, "rb") as f:  # opened per read: sysfs regenerates the value on each open
            return float(f.read())
    except (OSError, ValueError) as err:
        raise PowerReadError(f"could not read power sensor file {path}: {err}") from err


class TegrastatsReader:
    """``tegrastats`` run as a subprocess; read() waits for its next line.

    Args:
        interval_ms: how often tegrastats prints a line.
        command: the command to run instead of ``tegrastats --interval N`` (a stand-in in tests).
        lines: recorded lines to replay instead of running anything; read() returns None and the
            reader becomes unavailable once they run out.
    """

    name = "tegrastats"
    self_paced = True

    def __init__(
        self, interval_ms: int = 100, command: Sequence[str] | None = None, lines: Iterable[str] | None = None
    ) -> None:
        self.command = (
            list(command) if command is not None else ["tegrastats", "--interval", str(interval_ms)]
        )
        self.rails: list[str] = []
        self._lines: Iterator[str] | None = iter(lines) if lines is not None else None
        self._proc: subprocess.Popen[str] | None = None
        self._warned = False
        self.reason = ""
        if self._lines is None and shutil.which(self.command[0]) is None:
            self.reason = f"{self.command[0]!r} is not on PATH"
        self.available = not self.reason

    def _next_line(self) -> str | None:
        if self._lines is not None:
            return next(self._lines, None)
        if self._proc is None:
            command = self.command
            if shutil.which("stdbuf"):  # C stdio block-buffers into a pipe: lines would come in bursts
                command = ["stdbuf", "-oL", *command]
            self._proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
            )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line:
            return line
        code = self._proc.wait()
        err = self._proc.stderr.read().strip() if self._proc.stderr else ""
        raise PowerReadError(f"tegrastats ({' '.join(self.command)}) exited with code {code}: {err[-500:]}")

    def read(self) -> PowerSample | None:
        if not self.available:
            return None
        line = self._next_line()
        t_s = time.monotonic()
        if line is None:
            self.available = False
            return None
        try:
            parsed = parse_tegrastats(line)
        except ParseError as err:
            self._warn_once(f"skipping a line tegrastats printed: {err}")
            return None
        if not parsed.rails_mw:
            self._warn_once("tegrastats printed no power rails on this board (try running it as root)")
            return None
        self.rails = list(parsed.rails_mw)
        rail = _pick_input_rail(self.rails)
        power = parsed.rails_mw[rail] if rail else sum(parsed.rails_mw.values())
        return PowerSample(t_s, power, tuple(parsed.rails_mw.items()))

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def describe(self) -> dict[str, str]:
        rail = _pick_input_rail(self.rails)
        return {
            "power_source": self.name,
            "rails": ",".join(self.rails),
            "power_rail": rail or ("sum of all rails" if self.rails else "VDD_IN"),
        }


class NvmlReader:
    """Board power of a discrete NVIDIA GPU through NVML (``pip install nvidia-ml-py``).

    Args:
        index: the GPU's NVML index.
        nvml_module: a module with pynvml's functions, injected by tests; default ``import pynvml``.
    """

    name = "nvml"
    self_paced = False

    def __init__(self, index: int = 0, nvml_module: object | None = None) -> None:
        self.index = index
        self.gpu = ""
        self.available = False
        self.reason = ""
        self._nvml = nvml_module
        self._handle = None
        if self._nvml is None:
            try:
                import pynvml  # optional: only workstations with an NVIDIA GPU need it

                self._nvml = pynvml
            except ImportError:
                self.reason = "pynvml is not installed (pip install nvidia-ml-py)"
                return
        try:
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml.nvmlDeviceGetPowerUsage(self._handle)  # some GPUs (and Jetsons) report no power
            name = self._nvml.nvmlDeviceGetName(self._handle)
            self.gpu = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as err:  # pynvml raises its own NVMLError subclasses, one per return code
            self.reason = f"NVML has no power reading for GPU {index}: {err}"
            return
        self.available = True

    def read(self) -> PowerSample | None:
        if not self.available:
            return None
        try:
            power = float(self._nvml.nvmlDeviceGetPowerUsage(self._handle))  # mW
        except Exception as err:
            raise PowerReadError(f"NVML power reading of GPU {self.index} failed: {err}") from err
        return PowerSample(time.monotonic(), power, (("board", power),))

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down a library that is going away anyway
                pass

    def describe(self) -> dict[str, str]:
        return {"power_source": self.name, "rails": "board", "power_rail": "board", "gpu": self.gpu}


@dataclass(frozen=True)
class _RaplDomain:
    name: str  # e.g. package-0
    energy_file: Path
    max_energy_uj: int  # the counter wraps to 0 after this


class RaplReader:
    """Package power of x86 CPUs from the RAPL energy counters (powercap).

    Power is the counter difference over the monotonic time since the previous read, so the first
    read only primes the counter and returns None.

    Args:
        root: filesystem root to look under (a fake tree in tests).
    """

    name = "rapl"
    self_paced = False
    GLOB = "sys/class/powercap/intel-rapl:*"

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)
        self.domains: list[_RaplDomain] = []
        self.reason = ""
        self._prev: tuple[float, list[int]] | None = None
        # top level only: intel-rapl:0 is a package; intel-rapl:0:0 (core, uncore, dram) lies inside it
        tops = [p for p in sorted(self.root.glob(self.GLOB)) if re.fullmatch(r"intel-rapl:\d+", p.name)]
        try:
            for top in tops:
                name_file = top / "name"
                name = name_file.read_text().strip() if name_file.is_file() else top.name
                max_uj = int((top / "max_energy_range_uj").read_text())
                (top / "energy_uj").read_text()  # root-only since Linux 5.10 (CVE-2020-8694)
                self.domains.append(_RaplDomain(name, top / "energy_uj", max_uj))
        except (OSError, ValueError) as err:
            self.domains = []
            self.reason = f"RAPL counters under {self.root / 'sys/class/powercap'} are not readable: {err}"
        if not tops:
            self.reason = f"no RAPL package domain under {self.root / 'sys/class/powercap'}"
        self.available = bool(self.domains)

    def read(self) -> PowerSample | None:
        if not self.available:
            return None
        t_s = time.monotonic()
        try:
            energy = [int(d.energy_file.read_text()) for d in self.domains]
        except (OSError, ValueError) as err:
            raise PowerReadError(f"could not read a RAPL energy counter: {err}") from err
        prev, self._prev = self._prev, (t_s, energy)
        if prev is None or t_s <= prev[0]:
            return None
        dt_s = t_s - prev[0]
        rails = []
        for d, now, before in zip(self.domains, energy, prev[1]):
            delta_uj = now - before if now >= before else now + d.max_energy_uj - before
            rails.append((d.name, delta_uj / dt_s / 1000.0))  # uJ/s = uW
        return PowerSample(t_s, sum(p for _, p in rails), tuple(rails))

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, str]:
        names = ",".join(d.name for d in self.domains)
        return {"power_source": self.name, "rails": names, "power_rail": f"sum({names})"}


def discover(
    root: Path = Path("/"),
    prefer: str = "auto",
    rail: str | None = None,
    interval_ms: int = 100,
    nvml_module: object | None = None,
    tegrastats_command: Sequence[str] | None = None,
) -> PowerReader:
    """Find a power source.

    Args:
        root: filesystem root for the sysfs readers (a fake tree in tests).
        prefer: "auto" (ina3221, tegrastats, nvml, rapl: the first available), one of those names
            (it must be available), or "none".
        rail: the INA3221 rail to report; default VDD_IN.
        interval_ms: tegrastats' print interval.
        nvml_module: passed to NvmlReader (tests inject a fake).
        tegrastats_command: passed to TegrastatsReader (tests inject a stand-in).

    Returns:
        The chosen reader, or an UnavailableReader saying what was tried when "auto" found nothing.

    Raises:
        PowerReadError: an explicitly named source is not available.
        ValueError: ``prefer`` is not a known source.
    """
    builders = {
        "ina3221": lambda: Ina3221Reader(root, rail=rail),
        "tegrastats": lambda: TegrastatsReader(interval_ms, command=tegrastats_command),
        "nvml": lambda: NvmlReader(nvml_module=nvml_module),
        "rapl": lambda: RaplReader(root),
    }
    if prefer == "none":
        return UnavailableReader("power measurement was switched off (power source 'none')")
    if prefer != "auto" and prefer not in builders:
        raise ValueError(f"unknown power source {prefer!r}; use auto, none or one of {', '.join(SOURCES)}.")

    reasons = []
    for source in SOURCES if prefer == "auto" else (prefer,):
        reader = builders[source]()
        if reader.available:
            log.info("power source: %s (%s)", source, reader.describe())
            return reader
        reader.close()
        reasons.append(f"{source}: {reader.reason}")
        if prefer != "auto":
            raise PowerReadError(
                f"power source {source!r} was asked for but is not available: {reader.reason}. "
                "Choose 'auto' to take whichever source exists, or 'none' to measure latency only."
            )
    reader = UnavailableReader("; ".join(reasons))
    log.warning("no power source found, measuring without power (%s)", reader.reason)
    return reader


class Sampler:
    """Polls a reader on a background thread and keeps the samples.

    Args:
        reader: the power source.
        rate_hz: polls per second; ignored for self-paced readers, which set their own pace.
    """

    def __init__(self, reader: PowerReader, rate_hz: float = 20.0) -> None:
        if rate_hz <= 0:
            raise ValueError(f"the sampling rate must be positive, got {rate_hz} Hz")
        self.reader = reader
        self.period_s = 1.0 / rate_hz
        self._samples: list[PowerSample] = []
        self._times: list[float] = []  # the samples' t_s, for bisecting
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> Sampler:
        if self._thread is None and self.reader.available:
            self._thread = threading.Thread(target=self._run, name=f"power-{self.reader.name}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                sample = self.reader.read()
            except BaseException as err:  # re-raised in the caller's thread by stop()/samples_between()
                self._error = err
                return
            if sample is not None:
                with self._lock:
                    self._samples.append(sample)
                    self._times.append(sample.t_s)
            if self.reader.self_paced:
                if not self.reader.available:  # recorded lines ran out
                    return
                continue
            # A fixed schedule rather than sleep(period): the read's own time does not add up as drift.
            next_t += self.period_s
            now = time.monotonic()
            if next_t < now - self.period_s:  # fell behind (e.g. suspended): skip the missed ticks, no burst
                next_t = now
            self._stop.wait(max(0.0, next_t - now))

    def stop(self, *, raise_failure: bool = True) -> list[PowerSample]:
        """Stop polling and return every sample taken.

        Args:
            raise_failure: raise a failure of the reader; False returns the samples taken before it
                (the failure is then in ``failure``).

        Raises:
            PowerReadError: the reader failed on the sampling thread (unless ``raise_failure`` is False).
        """
        self._stop.set()
        if self._thread is not None:
            # A self-paced reader may be blocked on its next line: give it a few of its periods.
            self._thread.join(timeout=max(5.0, 5 * self.period_s))
        if raise_failure:
            self._raise_if_failed()
        with self._lock:
            return list(self._samples)

    def samples_between(self, t0_s: float, t1_s: float) -> list[PowerSample]:
        """The samples with t0_s <= t_s <= t1_s (times from mark() or time.monotonic())."""
        self._raise_if_failed()
        with self._lock:
            lo = bisect.bisect_left(self._times, t0_s)
            hi = bisect.bisect_right(self._times, t1_s)
            return self._samples[lo:hi]

    @staticmethod
    def mark() -> float:
        """Now, on the clock the samples' t_s use."""
        return time.monotonic()

    @property
    def failure(self) -> PowerReadError | None:
        """Why the reader stopped on the sampling thread, or None while it has not failed."""
        err = self._error
        if err is None or isinstance(err, PowerReadError):
            return err
        wrapped = PowerReadError(f"the {self.reader.name} power reader failed while sampling: {err!r}")
        wrapped.__cause__ = err
        return wrapped

    def _raise_if_failed(self) -> None:
        failure = self.failure
        if failure is not None:
            raise failure

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.stop()  # raises a reader failure
        else:  # the block's own exception is the one to see
            self._stop.set()


def trapezoid_mj(samples: Sequence[PowerSample]) -> float:
    """Energy in mJ: the trapezoid integral of power_mw over t_s (mW x s). 0 for fewer than 2 samples."""
    return sum((a.power_mw + b.power_mw) / 2.0 * (b.t_s - a.t_s) for a, b in zip(samples[:-1], samples[1:]))


def mean_power_mw(samples: Sequence[PowerSample]) -> float:
    """Time-weighted mean power (integral over duration), so uneven sampling does not bias it.

    Raises:
        ValueError: there are no samples.
    """
    if not samples:
        raise ValueError("no power samples to average; was the sampler running during the measurement?")
    duration_s = samples[-1].t_s - samples[0].t_s
    if duration_s <= 0:
        return sum(s.power_mw for s in samples) / len(samples)
    return trapezoid_mj(samples) / duration_s


def max_gap_s(samples: Sequence[PowerSample]) -> float:
    """The longest time between consecutive samples; inf for fewer than 2 (nothing is covered)."""
    if len(samples) < 2:
        return float("inf")
    return max(b.t_s - a.t_s for a, b in zip(samples[:-1], samples[1:]))
