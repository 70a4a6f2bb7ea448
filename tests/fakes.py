"""Fake hardware for tests: a sysfs tree that serves an INA3221 whose power changes over time."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

HWMON = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon7"  # the hwmon number varies on real boards


class FakeIna3221:
    """A sysfs tree whose VDD_IN power follows ``f(t)``; every value served is recorded."""

    VOLTS_MV = 5000.0

    def __init__(self, root: Path, f, rate_hz: float = 400.0):
        self.root, self.f, self.period = root, f, 1.0 / rate_hz
        self.hwmon = root / HWMON
        self.hwmon.mkdir(parents=True)
        for ch, label in ((1, "VDD_IN"), (2, "VDD_CPU_GPU_CV"), (3, "NC")):
            (self.hwmon / f"in{ch}_label").write_text(label + "\n")
            (self.hwmon / f"in{ch}_input").write_text(f"{int(self.VOLTS_MV)}\n")
            (self.hwmon / f"curr{ch}_input").write_text("100\n")
        self.served: list[tuple[float, float]] = []  # (monotonic time from which, power in mW)
        self._stop = threading.Event()
        self._serve(time.monotonic())
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _serve(self, t: float) -> None:
        current_ma = round(self.f(t) / self.VOLTS_MV * 1000)  # the driver reports whole mA
        tmp = self.hwmon / ".curr1_input.tmp"
        tmp.write_text(f"{current_ma}\n")
        os.replace(tmp, self.hwmon / "curr1_input")
        self.served.append((time.monotonic(), self.VOLTS_MV * current_ma / 1000))

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._serve(time.monotonic())

    def exact_mean_mw(self, t0: float, t1: float) -> float:
        """Integral of the step function the tree served over [t0, t1], divided by t1 - t0."""
        total = 0.0
        for (ta, p), (tb, _) in zip(self.served, self.served[1:] + [(math.inf, 0.0)]):
            lo, hi = max(ta, t0), min(tb, t1)
            if hi > lo:
                total += p * (hi - lo)
        return total / (t1 - t0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
