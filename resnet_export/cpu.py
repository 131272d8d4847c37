"""The CPU an artifact runs on: what it is, and which INT8 weight form ONNX Runtime computes exactly there.

ONNX Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into integer kernels. With uint8
activations and int8 weights (u8s8) on x86 CPUs without VNNI (AVX2 alone, AVX-512 before Cascade Lake,
Zen 2/3) those kernels multiply with ``vpmaddubsw``, which adds each pair of u8*s8 products into a
16-bit register and saturates: 2 * 255 * 127 = 64770 does not fit in 32767. Weights kept to 7 bits
(|w| <= 64, ONNX Runtime's ``reduce_range``; OpenVINO's and NNCF's "overflow fix") bound every pair by
2 * 255 * 64 = 32640, so the same kernels are exact on every CPU. VNNI (``vpdpbusd``), AMX and ARM64's
dot products accumulate in 32 bits and are exact with full 8-bit weights.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

#: The ISA flags that decide how INT8 is computed, as /proc/cpuinfo names them.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
#: The CPU-target weight forms: portable (7-bit weights, exact everywhere) and vnni (8-bit, exact only
#: where products accumulate in 32 bits).
CPU_FORMS = {"portable": 7, "vnni": 8}
#: The largest |weight| of ONNX Runtime's 7-bit form (reduce_range: symmetric [-64, 64]): two uint8 products
#: of such weights add to at most 2 * 255 * 64 = 32640, inside the 16 bits where CPUs without VNNI add them.
PEAK_7BIT = 64


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """This machine's CPU: vendor, model name, architecture, logical cores and the INT8-relevant flags."""
    import os

    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not key and fields:  # first processor block is enough
                break
            fields.setdefault(key, value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id") or platform.processor() or None,
        "model": fields.get("model name") or None,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "flags": [flag for flag in INT8_FLAGS if flag in flags],
    }


def exact_u8s8(info: dict) -> bool:
    """Whether ONNX Runtime's fused u8s8 kernels accumulate without saturating on this CPU (VNNI, AMX, ARM64)."""
    if info.get("arch") in ("aarch64", "arm64"):
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(info.get("flags", [])))


def describe_cpu(info: dict) -> str:
    """One phrase for a CPU: model, architecture and flags, e.g. ``AMD EPYC 7B13 (x86_64: avx2)``."""
    if not info:
        return "an unrecorded CPU"
    flags = " ".join(info.get("flags") or []) or "no AVX2"
    return f"{info.get('model') or info.get('vendor') or 'unknown CPU'} ({info.get('arch')}: {flags})"


def saturation_risk(info: dict) -> str | None:
    """Why full 8-bit u8s8 weights may saturate on this CPU, or None where they are exact."""
    if exact_u8s8(info):
        return None
    return (f"{describe_cpu(info)} has no VNNI: ONNX Runtime's fused u8s8 kernels add pairs of products "
            "in 16 bits and saturate with 8-bit weights")
