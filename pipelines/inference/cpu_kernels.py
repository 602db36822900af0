"""Which CPU kernels this machine offers, from `/proc/cpuinfo`, and what they mean for the numbers."""
from __future__ import annotations

import platform
from typing import Any, Iterable, Optional

# the instruction sets that decide dense fp32 and int8 speed (no x86 CPU has sparse-matrix kernels)
KERNELS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
           "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[set[str]]:
    """The flags of the first processor listed (x86 `flags`, ARM `Features`); None where there is no
    such file (macOS, Windows)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return set()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def explain(kernels: Iterable[str]) -> str:
    """One line: why sparse models run no faster here, and what int8 and storage gain."""
    have = set(kernels)
    int8 = [k for k in INT8_DOT if k in have]
    int8_part = (f"int8 does ({', '.join(int8)} int8 dot products)" if int8
                 else "int8 does (fewer bytes per weight, even without VNNI/AMX dot-product instructions)")
    return ("None of these are sparse kernels: ONNX Runtime's CPU provider multiplies pruned weights as dense "
            "matrices, so unstructured sparsity brings no speed-up (ratio ≈ 1); " + int8_part +
            ", and so does storage (the compressed sparse encoding).")


def machine_kernels(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    flags = cpu_flags(cpuinfo)
    kernels = [k for k in KERNELS if flags and k in flags]
    return {"cpu": cpu_model(cpuinfo), "kernels": kernels if flags is not None else None,
            "explanation": explain(kernels)}
