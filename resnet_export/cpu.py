"""The CPU an artifact runs on: what it is, and which INT8 weight form ONNX Runtime computes exactly there.

ONNX Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into integer kernels. With uint8
activations and int8 weights (u8s8) on x86 CPUs without VNNI (AVX2 alone, AVX-512 before Cascade Lake,
Zen 2/3) those kernels multiply with ``vpmaddubsw``, which adds each pair of u8*s8 products into a
16-bit register and saturates: 2 * 255 * 127 = 64770 does not fit in 32767. Weights kept to 7 bits
(|w| <= 64, ONNX Runtime's ``reduce_range``; OpenVINO's and NNCF's "overflow fix") bound every pair by
2 * 255 * 64 = 32640, so the same kernels are exact on every CPU. VNNI (``vpdpbusd``), AMX and ARM64's
dot products accumulate in 32 bits and are exact with full 8-bit weights.

Which of these this CPU does is measured (``kernel_probe``), once per process, and recorded beside its flags:
the flags say what the CPU is, the probe what ONNX Runtime's kernels do on it (under an emulator the two differ).
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
    """This machine's CPU: vendor, model name, architecture, logical cores, the INT8-relevant flags, and what its
    u8s8 kernels were measured to do (``u8s8``: ``kernel_probe.probe``)."""
    from .kernel_probe import probe

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
        "u8s8": probe(),
    }


def exact_u8s8(info: dict) -> bool:
    """Whether ONNX Runtime's fused u8s8 kernels add 8-bit weights' products without saturating on this CPU: as
    measured (``info["u8s8"]``); for a CPU recorded before the toolkit measured it, as its flags imply (VNNI, AMX and
    ARM64 add in 32 bits)."""
    if "u8s8" in info:
        return not info["u8s8"]["pair_saturation"]
    if info.get("arch") in ("aarch64", "arm64"):
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(info.get("flags", [])))


def describe_cpu(info: dict) -> str:
    """One phrase for a CPU: model, architecture, flags and, where measured, whether its u8s8 pairs saturate, e.g.
    ``AMD EPYC 7B13 (x86_64: avx2; u8s8 pairs saturate, measured)``."""
    if not info:
        return "an unrecorded CPU"
    flags = " ".join(info.get("flags") or []) or "no AVX2"
    measured = ""
    if "u8s8" in info:
        measured = f"; u8s8 pairs {'saturate' if info['u8s8']['pair_saturation'] else 'exact'}, measured"
    return f"{info.get('model') or info.get('vendor') or 'unknown CPU'} ({info.get('arch')}: {flags}{measured})"


#: Best INT8 dot-product instruction set first: what decides a CPU's INT8 speed class.
INT8_ISA_ORDER = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
