"""tegrastats and trtexec parsers, field by field against recorded output."""

import pytest

from edge_agent.parsers import ParseError, parse_tegrastats, parse_trtexec

from conftest import SHARED

TEGRASTATS = (SHARED / "fixtures" / "tegrastats-orin.txt").read_text().splitlines()

# The performance summary trtexec printed, as recorded in ../shared/fixtures/README.md
# (TensorRT 8.6+/10.x: percentiles 90, 95 and 99).
TRTEXEC = """\
[I] Throughput: 1099.65 qps
[I] Latency: min = 1.12085 ms, max = 5.30969 ms, mean = 1.17602 ms, median = 1.17322 ms, percentile(90%) = 1.18164 ms, percentile(95%) = 1.18457 ms, percentile(99%) = 1.20386 ms
[I] GPU Compute Time: min = 0.803711 ms, max = 4.93372 ms, mean = 0.818735 ms, median = 0.809937 ms, percentile(90%) = 0.811035 ms, percentile(95%) = 0.811035 ms, percentile(99%) = 0.812012 ms
"""  # noqa: E501


def test_tegrastats_orin_nano_idle():
    line = parse_tegrastats(TEGRASTATS[0])
    assert line.timestamp == "07-14-2025 10:29:36"
    assert line.ram_used_mb == 2147 and line.ram_total_mb == 7620
    assert line.cpu_loads_pct == [0.0] * 6
    assert line.cpu_freqs_mhz == [729.0] * 6
    assert line.gpu_load_pct == 0.0 and line.gpu_freq_mhz is None  # `GR3D_FREQ 0%`: no clock printed
    assert line.emc_load_pct is None  # this line has no EMC_FREQ field
    assert line.temps_c == {
        "cpu": 47.687,
        "soc2": 46.718,
        "soc0": 47.468,
        "gpu": 48.625,
        "tj": 48.625,
        "soc1": 48.25,
    }
    assert line.rails_mw == {"VDD_IN": 4556.0, "VDD_CPU_GPU_CV": 483.0, "VDD_SOC": 1451.0}
    assert line.rails_avg_mw == {"VDD_IN": 4556.0, "VDD_CPU_GPU_CV": 483.0, "VDD_SOC": 1451.0}
    assert "RAM" not in line.rails_mw and "SWAP" not in line.rails_mw  # `2147/7620MB` is not a rail


def test_tegrastats_orin_under_gpu_load():
    line = parse_tegrastats(TEGRASTATS[1])
    assert line.timestamp == "05-15-2025 18:30:28"
    assert line.ram_used_mb == 6982 and line.ram_total_mb == 7620
    assert line.emc_load_pct == 18.0 and line.emc_freq_mhz == 3199.0
    assert line.gpu_load_pct == 84.0 and line.gpu_freq_mhz == 713.0  # `84%@[713]`
    assert line.temps_c == {"tj": 65.562, "soc1": 64.718, "cv2": 60.875}
    assert line.cpu_loads_pct == [] and line.cpu_freqs_mhz == []  # elided by its publisher
    # instant and running average differ on this line: they must not be swapped
    assert line.rails_mw == {"VDD_IN": 17946.0, "VDD_CPU_GPU_CV": 8896.0, "VDD_SOC": 3923.0}
    assert line.rails_avg_mw == {"VDD_IN": 15710.0, "VDD_CPU_GPU_CV": 7585.0, "VDD_SOC": 3515.0}


def test_tegrastats_gr3d_without_brackets_and_offline_cores():
    line = parse_tegrastats(
        "RAM 3000/7620MB CPU [12%@1510,off,3%@729] GR3D_FREQ 62%@612 VDD_IN 9000mW/8000mW"
    )
    assert line.gpu_load_pct == 62.0 and line.gpu_freq_mhz == 612.0
    assert line.cpu_loads_pct == [12.0, 0.0, 3.0]  # the offline core keeps its index
    assert line.cpu_freqs_mhz == [1510.0, 0.0, 729.0]
    assert line.timestamp is None


def test_tegrastats_old_format_without_units_and_other_rail_names():
    # older JetPacks print rails without `mW`; rail names differ by board (Nano: POM_*, AGX: VIN_*)
    line = parse_tegrastats(
        "RAM 1570/3964MB (lfb 4x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lc 0kB) CPU [5%@102,2%@102] "
        "EMC_FREQ 0% GR3D_FREQ 0%@76 PLL@33C thermal@31.25C POM_5V_IN 1234/1200 POM_5V_GPU 40/41"
    )
    assert line.rails_mw == {"POM_5V_IN": 1234.0, "POM_5V_GPU": 40.0}
    assert line.rails_avg_mw == {"POM_5V_IN": 1200.0, "POM_5V_GPU": 41.0}
    assert line.temps_c == {"PLL": 33.0, "thermal": 31.25}
    assert line.emc_load_pct == 0.0 and line.emc_freq_mhz is None
    assert line.gpu_freq_mhz == 76.0


def test_tegrastats_rails_are_discovered_not_hard_coded():
    line = parse_tegrastats("VDD_GPU_SOC 2000mW/2000mW VDD_CPU_CV 800mW/800mW VIN_SYS_5V0 3500mW/3400mW")
    assert line.rails_mw == {"VDD_GPU_SOC": 2000.0, "VDD_CPU_CV": 800.0, "VIN_SYS_5V0": 3500.0}
    assert line.ram_used_mb is None


@pytest.mark.parametrize("garbage", ["", "tegrastats: command not found", "CPU [0%@729] GR3D_FREQ 0%"])
def test_tegrastats_garbage_raises(garbage):
    with pytest.raises(ParseError, match="not a tegrastats line") as err:
        parse_tegrastats(garbage)
    assert repr(garbage.strip()) in str(err.value)  # the message quotes the line


def test_trtexec_summary_field_by_field():
    s = parse_trtexec(TRTEXEC)
    assert s.throughput_qps == 1099.65
    lat = s.latency
    assert (lat.min_ms, lat.max_ms, lat.mean_ms, lat.median_ms) == (1.12085, 5.30969, 1.17602, 1.17322)
    assert lat.percentiles_ms == {90.0: 1.18164, 95.0: 1.18457, 99.0: 1.20386}
    gpu = s.gpu_compute
    assert (gpu.min_ms, gpu.max_ms, gpu.mean_ms, gpu.median_ms) == (0.803711, 4.93372, 0.818735, 0.809937)
    assert gpu.percentiles_ms == {90.0: 0.811035, 95.0: 0.811035, 99.0: 0.812012}


def test_trtexec_older_build_with_date_prefix_and_only_p99():
    # TensorRT 8.2-8.5 style: `[date] [I]` prefixes, only the 99th percentile, and the lines around it
    # whose labels also end in "Latency" / "GPU Compute Time" must not be taken for the summary.
    text = """\
[05/06/2022-04:57:00] [I] === Performance summary ===
[05/06/2022-04:57:00] [I] Throughput: 37418.4 qps
[05/06/2022-04:57:00] [I] Latency: min = 0.0214844 ms, max = 4.28027 ms, mean = 0.0225213 ms, median = 0.0224609 ms, percentile(99%) = 0.0307159 ms
[05/06/2022-04:57:00] [I] End-to-End Host Latency: min = 9 ms, max = 9 ms, mean = 9 ms, median = 9 ms, percentile(99%) = 9 ms
[05/06/2022-04:57:00] [I] H2D Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(99%) = 0 ms
[05/06/2022-04:57:00] [I] GPU Compute Time: min = 0.015625 ms, max = 4.27 ms, mean = 0.0163 ms, median = 0.0162 ms, percentile(99%) = 0.0194 ms
[05/06/2022-04:57:00] [I] Total GPU Compute Time: 2.99 s
&&&& PASSED TensorRT.trtexec [TensorRT v8205] # trtexec --onnx=model.onnx
"""  # noqa: E501
    s = parse_trtexec(text)
    assert s.throughput_qps == 37418.4
    assert s.latency.min_ms == 0.0214844 and s.latency.median_ms == 0.0224609
    assert s.latency.percentiles_ms == {99.0: 0.0307159}
    assert s.gpu_compute.mean_ms == 0.0163 and s.gpu_compute.percentiles_ms == {99.0: 0.0194}


def test_trtexec_tolerates_missing_fields():
    s = parse_trtexec("[11/28/2026-10:00:00] [I] Latency: min = 1.5 ms, mean = 2 ms\n")
    assert s.latency.min_ms == 1.5 and s.latency.mean_ms == 2.0
    assert s.latency.max_ms is None and s.latency.median_ms is None and s.latency.percentiles_ms == {}
    assert s.throughput_qps is None and s.gpu_compute is None


def test_trtexec_without_latency_raises():
    with pytest.raises(ParseError, match="Latency"):
        parse_trtexec(
            "[11/28/2026-10:00:00] [E] Error[4]: network has no inputs\n&&&& FAILED TensorRT.trtexec"
        )
