"""Energy used by training, from the GPU's own power sensor through NVML.

``EnergyMeter`` samples board power (``nvmlDeviceGetPowerUsage``) in a background thread on a
monotonic clock and integrates it with the trapezoid rule: the edge agent's NVML reader, sampler
and integral (``edge_agent.power``), so training and the device measure power one way. Where NVML
or a GPU is missing it reports ``available=False`` with the reason: never an invented number. Only
the GPU is metered: CPU, memory and the rest of the machine are not in the figure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edge_agent.power import NvmlReader, PowerSample, Sampler, mean_power_mw, trapezoid_mj

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
        self._nvml, self._reason = nvml, ""
        self._reader: NvmlReader | None = None
        self._sampler: Sampler | None = None
        self._samples: list[PowerSample] = []
        self._start = self._end = 0.0
        self.source = "unavailable"
        self.reading: EnergyReading | None = None

    def _open(self) -> NvmlReader | None:
        try:
            nvml = self._nvml or _load_nvml()
        except Exception as exc:  # ImportError, or a pynvml that fails to load
            self._reason = f"no GPU power sensor readable through NVML ({type(exc).__name__}: {exc})"
        else:
            reader = NvmlReader(self.device_index, nvml_module=nvml)
            if reader.available:
                self.source = f"nvml:{reader.gpu}"
                return reader
            self._reason = reader.reason  # NVML_ERROR_LIBRARY_NOT_FOUND, NOT_SUPPORTED, ...
        log.info("training energy not metered: %s", self._reason)
        return None

    def __enter__(self) -> EnergyMeter:
        self._start = time.monotonic()
        self._reader = self._open()
        if self._reader is not None:
            self._sampler = Sampler(self._reader, rate_hz=1.0 / self.interval_s).start()
        return self

    def __exit__(self, *exc) -> None:
        self._end = time.monotonic()
        if self._sampler is not None:
            # a sensor that stops answering ends the series, not the training
            self._samples = self._sampler.stop(raise_failure=False)
            if self._sampler.failure is not None:
                self._reason = f"sampling stopped: {self._sampler.failure}"
            try:  # the series reaches the end of the block
                last = self._reader.read()
                if last is not None:
                    self._samples.append(last)
            except Exception:
                pass
            self._reader.close()
        self.reading = self._result()

    def _result(self) -> EnergyReading:
        duration = self._end - self._start
        samples = self._samples
        if self._sampler is None or len(samples) < 2:
            return EnergyReading(
                False,
                "unavailable",
                None,
                None,
                duration,
                len(samples),
                self._reason or "fewer than two power samples",
            )
        energy_j = trapezoid_mj(samples) / 1000.0
        return EnergyReading(
            True, self.source, energy_j, mean_power_mw(samples) / 1000.0, duration, len(samples), self._reason
        )
