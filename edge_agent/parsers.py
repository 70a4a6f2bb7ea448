"""Parsers for the text the Jetson tools print: one ``tegrastats`` line, a ``trtexec`` run's summary.

Pure functions over strings, standard library only, so they are tested against recorded output
field by field. Fields are found by name, never by position: boards name
their rails differently and tool versions add, drop and reorder fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edge_agent.errors import UserError


class ParseError(UserError, ValueError):
    """A tool's output did not hold the fields the parser needs."""


@dataclass(frozen=True)
class TegrastatsLine:
    """One ``tegrastats`` line. Fields a board or version does not print are None (or empty)."""

    rails_mw: dict[str, float]  # instant power per rail, e.g. {"VDD_IN": 4556.0}
    rails_avg_mw: dict[str, float]  # tegrastats' running average since it started
    temps_c: dict[str, float]  # e.g. {"cpu": 47.687, "tj": 48.625}
    gpu_load_pct: float | None = None
    gpu_freq_mhz: float | None = None
    emc_load_pct: float | None = None
    emc_freq_mhz: float | None = None
    ram_used_mb: float | None = None
    ram_total_mb: float | None = None
    # One entry per core in core order; an offline core ("off") reads 0 % at 0 MHz so that the
    # index stays the core number.
    cpu_loads_pct: list[float] = field(default_factory=list)
    cpu_freqs_mhz: list[float] = field(default_factory=list)
    timestamp: str | None = None  # as printed, e.g. "07-14-2025 10:29:36" (one-second resolution)


_NUM = r"-?\d+(?:\.\d+)?"
_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})")
# `VDD_IN 4556mW/4556mW`, or `VDD_IN 4556/4556` on older JetPacks. The lookarounds keep
# `RAM 2147/7620MB` and `IRAM 0/252kB` out: a unit other than mW is glued to the second number.
_RAIL = re.compile(rf"(?<![\w@])([A-Z][A-Z0-9_]*) ({_NUM})(?:mW)?/({_NUM})(?:mW)?(?![\w.])")
_RAM = re.compile(rf"\bRAM ({_NUM})/({_NUM})([kMG]B)")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(rf"({_NUM})%(?:@({_NUM}))?")
# `GR3D_FREQ 84%@[713]` (Orin; one clock per GPC, comma separated), `GR3D_FREQ 62%@612`, `GR3D_FREQ 0%`.
_LOAD_AT_FREQ = rf"\s+({_NUM})%(?:@\[?({_NUM})[\],\d]*)?"
_GR3D = re.compile(r"\bGR3D_FREQ" + _LOAD_AT_FREQ)
_EMC = re.compile(r"\bEMC_FREQ" + _LOAD_AT_FREQ)
# `cpu@47.687C`; the CPU list's `0%@729` has a `%` before the `@` and no `C` after the number.
_TEMP = re.compile(rf"(?<![\w%])([A-Za-z][\w]*)@({_NUM})C\b")
_TO_MB = {"kB": 1 / 1024, "MB": 1.0, "GB": 1024.0}


def parse_tegrastats(line: str) -> TegrastatsLine:
    """Parse one line of ``tegrastats`` output.

    Args:
        line: one line as printed, with or without its leading timestamp.

    Returns:
        The rails (mW), temperatures (degrees C), GPU/EMC load and clock, RAM and per-core CPU figures.

    Raises:
        ParseError: the line has neither a power rail nor a RAM field, so it is not tegrastats output.
    """
    rails_mw: dict[str, float] = {}
    rails_avg_mw: dict[str, float] = {}
    for name, inst, avg in _RAIL.findall(line):
        rails_mw[name] = float(inst)
        rails_avg_mw[name] = float(avg)

    ram = _RAM.search(line)
    if not rails_mw and ram is None:
        raise ParseError(
            f"not a tegrastats line (no power rail like 'VDD_IN 4556mW/4556mW' and no 'RAM used/totalMB'): "
            f"{line.strip()[:300]!r}"
        )

    loads: list[float] = []
    freqs: list[float] = []
    cpu = _CPU.search(line)
    if cpu:
        for entry in cpu.group(1).split(","):
            core = _CPU_CORE.fullmatch(entry.strip())
            loads.append(float(core.group(1)) if core else 0.0)
            freqs.append(float(core.group(2)) if core and core.group(2) else 0.0)

    gpu_load, gpu_freq = _load_and_freq(_GR3D.search(line))
    emc_load, emc_freq = _load_and_freq(_EMC.search(line))
    stamp = _TIMESTAMP.match(line)
    scale = _TO_MB[ram.group(3)] if ram else 1.0
    return TegrastatsLine(
        rails_mw=rails_mw,
        rails_avg_mw=rails_avg_mw,
        temps_c={name: float(value) for name, value in _TEMP.findall(line)},
        gpu_load_pct=gpu_load,
        gpu_freq_mhz=gpu_freq,
        emc_load_pct=emc_load,
        emc_freq_mhz=emc_freq,
        ram_used_mb=float(ram.group(1)) * scale if ram else None,
        ram_total_mb=float(ram.group(2)) * scale if ram else None,
        cpu_loads_pct=loads,
        cpu_freqs_mhz=freqs,
        timestamp=stamp.group(1) if stamp else None,
    )


def _load_and_freq(match: re.Match[str] | None) -> tuple[float | None, float | None]:
    if match is None:
        return None, None
    freq = match.group(2)
    return float(match.group(1)), float(freq) if freq is not None else None


@dataclass(frozen=True)
class LatencyStats:
    """One trtexec statistics line; a field the build did not print is None."""

    min_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    median_ms: float | None
    percentiles_ms: dict[float, float]  # {99.0: 1.20386}; builds before 8.6 print only 99 %


@dataclass(frozen=True)
class TrtexecSummary:
    """The performance summary at the end of a ``trtexec`` run."""

    throughput_qps: float | None
    latency: LatencyStats  # host-to-host, including transfers ("Host Latency" before TensorRT 8.4)
    gpu_compute: LatencyStats | None  # kernels only


# Up to three bracketed prefixes: `[11/28/2026-10:00:00] [I] ` (their own colons are why they go first).
_TRT_PREFIX = re.compile(r"^\s*(?:\[[^\]]*\]\s*)*")
_TRT_PAIR = re.compile(
    r"([A-Za-z]+)(?:\((\d+(?:\.\d+)?)%\))?\s*[=:]\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*ms\b"
)
_TRT_QPS = re.compile(r"([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*qps")


def parse_trtexec(text: str) -> TrtexecSummary:
    """Parse the performance summary out of ``trtexec``'s full output.

    Args:
        text: everything trtexec printed (log prefixes such as ``[date] [I]`` are fine).

    Returns:
        Throughput and the latency / GPU compute time statistics, found by field name.

    Raises:
        ParseError: there is no ``Latency:`` line, e.g. the run failed before its summary.
    """
    sections: dict[str, str] = {}
    for raw in text.splitlines():
        body = raw[_TRT_PREFIX.match(raw).end() :]
        label, sep, rest = body.partition(":")
        if sep:
            sections[label.strip()] = rest  # the last one wins: the summary comes at the end

    latency = sections.get("Latency", sections.get("Host Latency"))
    if latency is None:
        raise ParseError(
            "no 'Latency: min = ... ms' line in the trtexec output; the run probably failed before "
            "its performance summary, so check the end of the output for the error."
        )
    qps = _TRT_QPS.search(sections.get("Throughput", ""))
    gpu = sections.get("GPU Compute Time", sections.get("GPU Compute"))
    return TrtexecSummary(
        throughput_qps=float(qps.group(1)) if qps else None,
        latency=_latency_stats(latency),
        gpu_compute=_latency_stats(gpu) if gpu is not None else None,
    )


def _latency_stats(text: str) -> LatencyStats:
    values: dict[str, float] = {}
    percentiles: dict[float, float] = {}
    for key, pct, value in _TRT_PAIR.findall(text):
        if key == "percentile" and pct:
            percentiles[float(pct)] = float(value)
        else:
            values[key] = float(value)
    return LatencyStats(
        min_ms=values.get("min"),
        max_ms=values.get("max"),
        mean_ms=values.get("mean"),
        median_ms=values.get("median"),
        percentiles_ms=percentiles,
    )
