"""The report names the machine's CPU kernels from /proc/cpuinfo and explains the numbers with them."""
from pipelines.inference.cpu_kernels import machine_kernels

CPUINFO = """processor\t: 0
model name\t: Example CPU @ 2.0GHz
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8 hypervisor
"""


def test_kernels_come_from_the_flags_and_the_explanation_names_the_int8_ones(tmp_path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    found = machine_kernels(str(path))
    assert found["cpu"] == "Example CPU @ 2.0GHz"
    assert found["kernels"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile",
                                "amx_int8"]
    assert "no speed-up" in found["explanation"] and "avx512_vnni, amx_int8" in found["explanation"]


def test_without_vnni_or_cpuinfo_it_still_explains(tmp_path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("flags\t: sse4_2 avx avx2\n")
    assert "even without VNNI" in machine_kernels(str(path))["explanation"]
    missing = machine_kernels(str(tmp_path / "none"))
    assert missing["kernels"] is None and "sparse kernels" in missing["explanation"]
