"""collect_device_info against a fake Orin Nano tree and a recorded `nvpmodel -q`."""

import platform
from pathlib import Path

from edge_agent.device import collect_device_info

# `nvpmodel -q` on an Orin Nano Super (JetPack 6.2): the mode's name, then its number.
NVPMODEL_Q = "NV Power Mode: 15W\n0\n"


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def orin_nano_tree(root: Path) -> Path:
    write(
        root,
        "proc/device-tree/model",
        "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00",
    )
    write(
        root,
        "etc/nv_tegra_release",
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"  # noqa: E501
        "# KERNEL_VARIANT: oot\n",
    )
    write(root, "etc/os-release", 'NAME="Ubuntu"\nPRETTY_NAME="Ubuntu 22.04.5 LTS"\n')
    for i, (kind, milli_c) in enumerate(
        [
            ("cpu-thermal", "47687"),
            ("gpu-thermal", "48625"),
            ("cv0-thermal", "-256000"),
            ("tj-thermal", "48625"),
        ]
    ):
        write(root, f"sys/class/thermal/thermal_zone{i}/type", kind + "\n")
        write(root, f"sys/class/thermal/thermal_zone{i}/temp", milli_c + "\n")
    write(root, "sys/class/devfreq/17000000.gpu/cur_freq", "306000000\n")
    write(root, "sys/class/devfreq/15340000.vic/cur_freq", "115200000\n")
    write(root, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "729600\n")
    write(root, "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", "schedutil\n")
    return root


def fake_run(outputs: dict[str, str]):
    calls = []

    def run(command: list[str]) -> str | None:
        calls.append(command)
        return outputs.get(command[0])

    run.calls = calls
    return run


def test_orin_nano(tmp_path):
    run = fake_run({"nvpmodel": NVPMODEL_Q})
    info = collect_device_info(orin_nano_tree(tmp_path), run=run)
    assert ["nvpmodel", "-q"] in run.calls
    assert info["device_model"] == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    assert info["l4t_version"] == "36.4.3"
    assert info["jetpack_version"] == "6.2"  # from the table: no nvidia-jetpack package in the fake
    assert info["power_mode"] == "15W" and info["power_mode_id"] == "0"
    assert info["gpu_freq_mhz"] == "306"
    assert info["vic_freq_mhz"] == "115.2"
    assert "emc_freq_mhz" not in info  # Orin has no EMC devfreq node
    assert info["cpu_freq_mhz"] == "729.6" and info["cpu_governor"] == "schedutil"
    assert info["temp_cpu_c"] == "47.7" and info["temp_gpu_c"] == "48.6" and info["temp_tj_c"] == "48.6"
    assert "temp_cv0_c" not in info  # -256 C: the sensor is off
    assert info["os"] == "Ubuntu 22.04.5 LTS"
    assert info["python_version"] == platform.python_version()
    assert all(isinstance(v, str) for v in info.values())


def test_jetpack_package_wins_over_the_table_and_unknown_l4t_is_not_guessed(tmp_path):
    orin_nano_tree(tmp_path)
    info = collect_device_info(tmp_path, run=fake_run({"dpkg-query": "6.2.1+b38"}))
    assert info["jetpack_version"] == "6.2.1"
    assert "power_mode" not in info  # nvpmodel missing

    write(tmp_path, "etc/nv_tegra_release", "# R36 (release), REVISION: 9.9, GCID: 1\n")
    info = collect_device_info(tmp_path, run=fake_run({}))
    assert info["l4t_version"] == "36.9.9" and "jetpack_version" not in info


def test_emc_devfreq_and_older_gpu_name(tmp_path):
    write(tmp_path, "sys/class/devfreq/57000000.gv11b/cur_freq", "1377000000\n")
    write(tmp_path, "sys/class/devfreq/2c60000.emc/cur_freq", "2133000000\n")
    info = collect_device_info(tmp_path, run=fake_run({}))
    assert info["gpu_freq_mhz"] == "1377" and info["emc_freq_mhz"] == "2133"


def test_empty_root_gives_the_basics_without_raising(tmp_path):
    info = collect_device_info(tmp_path, run=fake_run({}))
    assert info["python_version"] == platform.python_version()
    assert info["device_model"].startswith(platform.machine())
    for key in (
        "l4t_version",
        "jetpack_version",
        "power_mode",
        "gpu_freq_mhz",
        "cpu_freq_mhz",
        "cpu_governor",
    ):
        assert key not in info
    assert not any(k.startswith("temp_") for k in info)


def test_non_jetson_model_from_cpuinfo(tmp_path):
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-9700 CPU @ 3.00GHz\n")
    info = collect_device_info(tmp_path, run=fake_run({}))
    assert info["device_model"] == f"{platform.machine()} Intel(R) Core(TM) i7-9700 CPU @ 3.00GHz"
