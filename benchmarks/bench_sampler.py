"""CPU cost of the power sampler: an INA3221 reader over a fake sysfs tree, polled at 20 and 100 Hz.

    python -m benchmarks.bench_sampler [--seconds 10]

The main thread sleeps while the sampler runs, so the process CPU time (time.process_time) per
second of wall time is the sampler's own cost: opening and reading six sysfs files per sample,
parsing them, and the thread's wake-ups. On the device each read also goes over I2C to the sensor,
which a tmpfs tree does not: the device's figures are to be measured there, these are the
Python-side floor.

Does not import benchmarks.common: that pulls in torch, which the edge agent never loads, and whose
threads would add to the CPU time measured here.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from edge_agent.power import Ina3221Reader, Sampler

RAILS = {1: ("VDD_IN", 5088, 895), 2: ("VDD_CPU_GPU_CV", 5080, 95), 3: ("VDD_SOC", 5080, 285)}


def fake_orin_sysfs(root: Path) -> Path:
    """Orin Nano's INA3221 hwmon layout (three rails and an unconnected channel) under root."""
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hwmon.mkdir(parents=True)
    for n, (label, mv, ma) in {**RAILS, 4: ("NC", 0, 0)}.items():
        (hwmon / f"in{n}_label").write_text(label + "\n")
        (hwmon / f"in{n}_input").write_text(f"{mv}\n")
        (hwmon / f"curr{n}_input").write_text(f"{ma}\n")
    return root


def measure(root: Path, rate_hz: float, seconds: float) -> tuple[float, float, int]:
    """Run a sampler for `seconds`; return (CPU % of one core, achieved Hz, samples)."""
    sampler = Sampler(Ina3221Reader(root), rate_hz=rate_hz)
    cpu0, wall0 = time.process_time(), time.monotonic()
    sampler.start()
    time.sleep(seconds)
    samples = sampler.stop()
    cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0
    span_s = samples[-1].t_s - samples[0].t_s
    return 100.0 * cpu_s / wall_s, (len(samples) - 1) / span_s, len(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="wall time per rate")
    p.add_argument("--rates", type=float, nargs="+", default=[20.0, 100.0])
    args = p.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {args.seconds:g} s per rate")
    with tempfile.TemporaryDirectory() as tmp:
        root = fake_orin_sysfs(Path(tmp))
        rows = [(rate, *measure(root, rate, args.seconds)) for rate in args.rates]
    print()
    print("| rate asked (Hz) | rate achieved (Hz) | samples | CPU (% of one core) |")
    print("|---:|---:|---:|---:|")
    for rate, cpu_pct, achieved_hz, n in rows:
        print(f"| {rate:g} | {achieved_hz:.2f} | {n} | {cpu_pct:.2f} |")


if __name__ == "__main__":
    main()
