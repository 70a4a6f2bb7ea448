"""Energy used by training, from the GPU's own power sensor through NVML.

``EnergyMeter`` samples board power (``nvmlDeviceGetPowerUsage``, mW) in a background thread on a
monotonic clock and integrates it with the trapezoid rule. Where NVML or a GPU is missing it
reports ``available=False`` with the reason: never an invented number. Only the GPU is metered:
CPU, memory and the rest of the machine are not in the figure.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnergyReading:
    available: bool
    source: str  # "nvml:<gpu name>" or "unavailable"
    energy_j: float | None  # trapezoid integral of the samples
    mean_power_w: float | None
    duration_s: float
    n_samples: int
    reason: str = ""  # why unavailable

    def metrics(self) -> dict[str, float]:
        """The figures for a tracker; empty when nothing was measured."""
        if not self.available:
            return {}
        return {"train_energy_j": self.energy_j, "train_mean_power_w": self.mean_power_w}


def trapezoid_j(times_s: list[float], power_w: list[float]) -> float:
    """Integral of power over time, trapezoid rule, in joules."""
    return sum(
        (t1 - t0) * (p0 + p1) / 2 for t0, t1, p0, p1 in zip(times_s, times_s[1:], power_w, power_w[1:])
    )


def _load_nvml():
    import pynvml  # from the nvidia-ml-py package

    return pynvml


class EnergyMeter:
    """Context manager: ``with EnergyMeter() as m: train(); reading = m.reading``.

    Args:
        device_index: which GPU.
        interval_s: sampling period (NVML updates power about every 20-100 ms).
        nvml: an NVML module to use instead of ``pynvml`` (tests inject a fake one).
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.1, nvml=None):
        self.device_index, self.interval_s = device_index, interval_s
        self._nvml, self._handle, self._reason = nvml, None, ""
        self._times: list[float] = []
        self._power: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = self._end = 0.0
        self.source = "unavailable"
        self.reading: EnergyReading | None = None

    def _open(self) -> bool:
        try:
            nvml = self._nvml or _load_nvml()
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
            name = nvml.nvmlDeviceGetName(self._handle)
            nvml.nvmlDeviceGetPowerUsage(self._handle)  # fails here when the board has no sensor
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NotSupported, ...
            self._reason = f"no GPU power sensor readable through NVML ({type(exc).__name__}: {exc})"
            log.info("training energy not metered: %s", self._reason)
            return False
        self._nvml = nvml
        self.source = f"nvml:{name.decode() if isinstance(name, bytes) else name}"
        return True

    def _sample(self) -> None:
        self._times.append(time.monotonic())
        self._power.append(self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as exc:  # a sensor that stops answering ends the series, not the training
                self._reason = f"sampling stopped: {exc}"
                return

    def __enter__(self) -> EnergyMeter:
        self._start = time.monotonic()
        if self._open():
            self._sample()
            self._thread = threading.Thread(target=self._run, name="energy-meter", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._end = time.monotonic()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            try:
                self._sample()
            except Exception:
                pass
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self.reading = self._result()

    def _result(self) -> EnergyReading:
        duration = self._end - self._start
        if self._thread is None or len(self._times) < 2:
            return EnergyReading(
                False,
                "unavailable",
                None,
                None,
                duration,
                len(self._times),
                self._reason or "fewer than two power samples",
            )
        energy = trapezoid_j(self._times, self._power)
        span = self._times[-1] - self._times[0]
        return EnergyReading(
            True, self.source, energy, energy / span, duration, len(self._times), self._reason
        )
