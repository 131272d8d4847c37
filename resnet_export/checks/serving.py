"""Which backend serves a CPU-target INT8 ONNX on this CPU: OpenVINO only where OpenVINO was verified on it.

OpenVINO's INT8 kernels are a computation of their own (other than ONNX Runtime's fused and exact runs), and
they differ per CPU (AVX2, VNNI, AMX). So ``quantize --target cpu`` verifies the artifact on OpenVINO too, against
the same reference, inputs and gate, and records the result with the CPU's kernel class (``openvino_result``).
``predict`` and ``triton --backend openvino`` use OpenVINO where that result passed on a CPU of this class; else
they verify it here and now against the reference the ONNX carries (``reference_record``), or serve it with ONNX
Runtime and say why in one line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..manifest import manifest_path
from .verify import GATES, Gate, Verification, verify
from ..runtime.runners import ort_providers

log = logging.getLogger(__name__)


def kernel_class(info: dict) -> str:
    """What decides a CPU's INT8 kernels: architecture, best INT8 instruction set, and how its u8s8 pairs were
    measured to add (``x86_64-avx512_vnni-u8s8 exact``)."""
    from ..cpu import INT8_ISA_ORDER

    isa = next((flag for flag in INT8_ISA_ORDER if flag in (info.get("flags") or [])), "no-avx2")
    measured = (info.get("u8s8") or {}).get("pair_saturation")
    pairs = "" if measured is None else f"-u8s8 {'saturating' if measured else 'exact'}"
    return f"{info.get('arch')}-{isa}{pairs}"


def cpu_int8(artifact: Path) -> bool:
    """Whether ``artifact`` is a CPU-target INT8 ONNX, by its metadata."""
    from ..onnx_graph import read_metadata

    precision = read_metadata(artifact).get("precision", {})
    return precision.get("dtype") == "int8" and precision.get("target") == "cpu"


def verify_on_openvino(path: Path, reference, inputs, gate: Gate, slack: int = 0) -> Verification:
    """The ONNX compiled by OpenVINO for this CPU against ``reference`` (a runner, or recorded logits) on
    ``inputs``, with ``gate``."""
    from ..runtime.runners import OpenVinoRunner

    candidate = OpenVinoRunner(path, "int8", None)
    return verify(reference, candidate, inputs, gate, described_reference="the artifact's reference", slack=slack)


def openvino_result(verification: Verification) -> dict:
    """What the manifest records of an OpenVINO verification: its outcome, metrics, gate and CPU class."""
    from ..cpu import cpu_info

    return {**verification.to_dict(), "kernel_class": kernel_class(cpu_info())}


def check_served(artifact: Path, allow_failed: bool = False) -> str:
    """Served = verified: what a summary line must say of ``artifact`` before any command serves it ("" when its
    manifest says it passed its gate).

    An artifact whose manifest records a failed gate is refused (UnverifiedArtifact, exit 2, naming the gate that
    failed) unless ``allow_failed``, and then served with a warning on every run; one without a manifest, or made
    without verification, is served with a one-line warning.
    """
    from ..errors import UnverifiedArtifact

    path = manifest_path(artifact)
    manifest = json.loads(path.read_text()) if path.is_file() else None
    verification = (manifest or {}).get("verification")
    if not verification:
        why = "has no manifest" if manifest is None else "was made without verification"
        log.warning(f"{artifact.name} {why}: served unverified (nothing says it matches its model)")
        return "unverified"
    if verification.get("passed"):
        return ""
    failed = "; ".join(verification.get("failures") or ["its gate"])
    if not allow_failed:
        raise UnverifiedArtifact(f"{artifact} failed its gate when it was made ({failed}): not served; pass "
                                 "`allow_failed` to serve it anyway")
    log.warning(f"{artifact.name} FAILED its gate when it was made ({failed}): served anyway, as asked")
    return "FAILED its gate, served as asked"


def warn_if_trt_int8_on_a_cpu(artifact: Path) -> None:
    """One line where a TensorRT-target INT8 ONNX is made or served on a machine without a CUDA GPU: on a CPU it runs
    Q/DQ around float kernels, about half the FP32 model's speed (resnet50 under `predict` on a 2-core Xeon: 6.9 vs
    14.5 img/s), and the CPU-target file is the one to serve there."""
    from ..runtime.device import cuda_gpus
    from ..onnx_graph import read_metadata

    precision = read_metadata(artifact).get("precision", {})
    if precision.get("dtype") == "int8" and precision.get("target") == "trt" and not cuda_gpus():
        log.warning(f"{artifact.name} is INT8 for TensorRT: on a CPU it runs slower than the FP32 model (Q/DQ around "
                    "float kernels); to serve on CPUs, make it with `--target cpu`")


@dataclass
class Choice:
    """The backend that serves an artifact, and why, in words."""

    backend: str
    verified: str


def openvino_unavailable() -> str | None:
    """Why OpenVINO cannot serve here, or None."""
    import importlib.util

    return None if importlib.util.find_spec("openvino") else "OpenVINO is not installed"


def serving_choice(artifact: Path, requested: str | None) -> Choice:
    """The backend for ``artifact`` on this machine: ``requested`` (ort, openvino, trt), or by default OpenVINO
    for a CPU-target INT8 ONNX where no CUDA GPU is visible; OpenVINO only as verified on this CPU class (see the
    module's docstring), falling back to ONNX Runtime with a warning."""
    from .serving import default_onnx_backend

    backend = requested or (default_onnx_backend(artifact) if artifact.suffix == ".onnx" else "trt")
    if backend != "openvino" or not cpu_int8(artifact):
        return Choice(backend, "")
    verified, why = openvino_verified_here(artifact)
    if verified:
        return Choice("openvino", verified)
    log.warning(f"{artifact.name}: not served by OpenVINO: {why}; serving it with ONNX Runtime (its fused and exact "
                "runs were verified)")
    return Choice("ort", "")


def openvino_verified_here(artifact: Path) -> tuple[str | None, str | None]:
    """How OpenVINO was verified to serve ``artifact`` on this CPU class (words), or None and why not: the result
    recorded when it was made on a CPU of this class, else a verification now against its recorded reference."""
    from ..cpu import cpu_info
    from .reference_record import read_record

    here = kernel_class(cpu_info())
    manifest = json.loads(manifest_path(artifact).read_text()) if manifest_path(artifact).is_file() else {}
    recorded = (manifest.get("backends") or {}).get("openvino")
    if recorded and recorded.get("kernel_class") == here:
        if not recorded["passed"]:
            return None, f"OpenVINO's run missed its gate on this CPU class ({here}) when it was made: " \
                         f"{'; '.join(recorded['failures'])}"
        return f"OpenVINO verified on this CPU class ({here}) when made: INT8 gate passed", None
    unavailable = openvino_unavailable()
    if unavailable:
        return None, unavailable
    record = read_record(artifact)
    if record is None:
        return None, (f"OpenVINO was not verified on this CPU class ({here}) and {artifact.name} records no reference "
                      "to verify it against now")
    gate = Gate(**((manifest.get("verification") or {}).get("gate") or GATES["int8"].__dict__))
    verification = verify_on_openvino(artifact, record.logits, record.as_inputs(), gate, slack=1)
    if not verification.passed:
        return None, (f"OpenVINO's run misses the INT8 gate on this CPU ({here}) against the reference {artifact.name} "
                      f"recorded: {'; '.join(verification.failures)}")
    return (f"OpenVINO verified here now ({here}) on the {len(record.inputs)} inputs {artifact.name} recorded: INT8 "
            "gate passed"), None


def default_onnx_backend(artifact: Path) -> str:
    """ort, or openvino for a CPU-target INT8 ONNX on a machine without a CUDA GPU when OpenVINO is installed.

    On the same INT8 file OpenVINO ran 1.05-1.1x ONNX Runtime's speed on AVX2 machines and 2-3x on an
    AMX one, where ONNX Runtime spends 91% of its time in QLinearConv kernels no session option changes
    (benchmarks/README.md, "ONNX Runtime and OpenVINO on the same INT8 file").
    """
    import importlib.util

    from ..onnx_graph import read_metadata

    precision = read_metadata(artifact).get("precision", {})
    if precision.get("dtype") != "int8" or precision.get("target") != "cpu":
        return "ort"
    if importlib.util.find_spec("openvino") is None or "CUDAExecutionProvider" in ort_providers():
        return "ort"
    return "openvino"
