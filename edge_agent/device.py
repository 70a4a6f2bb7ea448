"""What the device was when it measured: model, L4T/JetPack, power mode, clocks, temperatures, versions.

A latency or power figure cannot be compared without these, so the agent tags every result with
them. Everything is read from an injectable root and command runner so tests use a fake tree;
a file or command that is missing leaves its key out instead of failing.
"""

from __future__ import annotations

import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

Runner = Callable[[list[str]], "str | None"]

_L4T_LINE = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)")
# Exact L4T releases only (NVIDIA's JetPack archive); others are left out rather than guessed.
_JETPACK_FOR_L4T = {
    "36.4.4": "6.2.1",
    "36.4.3": "6.2",
    "36.4.0": "6.1",
    "36.3.0": "6.0",
    "36.2.0": "6.0 DP",
    "35.6.0": "5.1.4",
    "35.5.0": "5.1.3",
    "35.4.1": "5.1.2",
    "35.3.1": "5.1.1",
    "35.2.1": "5.1",
    "35.1.0": "5.0.2",
    "32.7.6": "4.6.6",
    "32.7.5": "4.6.5",
    "32.7.4": "4.6.4",
    "32.7.3": "4.6.3",
    "32.7.2": "4.6.2",
    "32.7.1": "4.6.1",
    "32.6.1": "4.6",
}
# devfreq names the device node after its driver, e.g. 17000000.ga10b (Orin), 57000000.gpu (Nano).
_GPU_DEVFREQ = {"gpu", "gk20a", "gm20b", "gp10b", "gv11b", "ga10b", "gb10b"}


def default_run(command: list[str]) -> str | None:
    """Run a command for its stdout; None if it is missing, fails or takes over 5 s."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def collect_device_info(root: Path = Path("/"), run: Runner | None = None) -> dict[str, str]:
    """Describe the device as string tags (for MLflow); unknown items are left out, never guessed.

    Args:
        root: filesystem root to read ``proc``, ``sys`` and ``etc`` under (a fake tree in tests).
        run: runs a command and returns its stdout or None; default: subprocess with a 5 s timeout.

    Returns:
        Keys among device_model, l4t_version, jetpack_version, power_mode(_id), gpu/emc/cpu_freq_mhz,
        cpu_governor, temp_<zone>_c, onnxruntime_version, tensorrt_version, python_version, os,
        kernel.
    """
    root = Path(root)
    run = run or default_run
    info: dict[str, str] = {}

    model = _read(root / "proc/device-tree/model")
    if model:
        info["device_model"] = model
    else:
        info["device_model"] = " ".join(filter(None, [platform.machine(), _cpu_model(root)])) or "unknown"

    release = _read(root / "etc/nv_tegra_release")
    match = _L4T_LINE.search(release or "")
    if match:
        l4t = ".".join(match.groups())
        info["l4t_version"] = l4t
        jetpack = _jetpack_package(run) or _JETPACK_FOR_L4T.get(l4t)
        if jetpack:
            info["jetpack_version"] = jetpack

    info.update(_power_mode(run(["nvpmodel", "-q"])))
    info.update(_devfreq(root))
    khz = _number(root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    if khz is not None:
        info["cpu_freq_mhz"] = _fmt(khz / 1000)
    governor = _read(root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor:
        info["cpu_governor"] = governor
    info.update(_temperatures(root))

    for key, module in (("onnxruntime_version", "onnxruntime"), ("tensorrt_version", "tensorrt")):
        version = _module_version(module)
        if version:
            info[key] = version
    info["python_version"] = platform.python_version()
    info["os"] = _os_name(root)
    info["kernel"] = platform.release()
    return info


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip("\x00\n\t ") or None  # device-tree strings end in NUL
    except OSError:
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _cpu_model(root: Path) -> str | None:
    # x86 says "model name", Raspberry Pi-style ARM says "Model", older ARM kernels "Hardware".
    cpuinfo = _read(root / "proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return None


def _jetpack_package(run: Runner) -> str | None:
    """The nvidia-jetpack meta-package's version (e.g. 6.2+b77 -> 6.2), when it is installed."""
    out = run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"])
    match = re.match(r"\s*(\d+(?:\.\d+)*)", out or "")
    return match.group(1) if match else None


def _power_mode(output: str | None) -> dict[str, str]:
    # `nvpmodel -q` prints "NV Power Mode: 15W" and then the mode's number on its own line.
    match = re.search(r"NV Power Mode\s*:\s*(\S.*?)\s*$", output or "", re.MULTILINE)
    if not match:
        return {}
    mode = {"power_mode": match.group(1)}
    number = re.match(r"\s*(\d+)\s*$", (output or "")[match.end() :].lstrip("\n").split("\n", 1)[0])
    if number:
        mode["power_mode_id"] = number.group(1)
    return mode


def _devfreq(root: Path) -> dict[str, str]:
    freqs: dict[str, str] = {}
    for cur in sorted((root / "sys/class/devfreq").glob("*/cur_freq")):
        hz = _number(cur)
        if hz is None:
            continue
        device = cur.parent.name.rsplit(".", 1)[-1].lower()  # 17000000.ga10b -> ga10b
        kind = "gpu" if device in _GPU_DEVFREQ else "emc" if "emc" in device else _key(device)
        freqs.setdefault(f"{kind}_freq_mhz", _fmt(hz / 1e6))
    return freqs


def _temperatures(root: Path) -> dict[str, str]:
    temps: dict[str, str] = {}
    zones = (root / "sys/class/thermal").glob("thermal_zone*")
    for zone in sorted(zones, key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        kind, milli_c = _read(zone / "type"), _number(zone / "temp")
        if (
            kind is None or milli_c is None or milli_c <= -40000
        ):  # Jetson reports -256 C for a sensor that is off
            continue
        name = _key(re.sub(r"[-_]thermal$", "", kind))
        key = f"temp_{name}_c"
        if key in temps:  # e.g. two "acpitz" zones on a PC
            key = f"temp_{name}{zone.name.removeprefix('thermal_zone')}_c"
        temps[key] = f"{milli_c / 1000:.1f}"
    return temps


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _module_version(module: str) -> str | None:
    try:
        imported = __import__(module)  # lazy: heavy, and absent on most machines (TensorRT)
    except Exception:  # a broken install (missing shared library) is as good as absent here
        return None
    return str(getattr(imported, "__version__", "")) or None


def _os_name(root: Path) -> str:
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', _read(root / "etc/os-release") or "", re.MULTILINE)
    return match.group(1) if match else platform.platform()
