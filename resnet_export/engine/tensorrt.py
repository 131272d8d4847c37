"""TensorRT itself: whether it is here, what it and the GPU are, and whether a plan built elsewhere runs here.

TensorRT is imported lazily, only in the functions that need it, so everything else works without it.
"""

from __future__ import annotations
import functools
import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from ..runtime import device
from ..errors import EXIT_TRT_UNAVAILABLE, ResnetExportError
from ..manifest import manifest_path


class TensorRTUnavailable(ResnetExportError):
    """TensorRT or a CUDA GPU is missing: the ONNX is kept and no engine is written."""

    exit_code = EXIT_TRT_UNAVAILABLE


class EngineError(ResnetExportError):
    """An engine cannot be built, or a plan cannot run here."""


#: Where TensorRT comes from: NVIDIA's packages on PyPI, which fetch the libraries from NVIDIA's own index.
TENSORRT_INSTALL = ("on a machine with an NVIDIA GPU, pip install tensorrt-cu13 (CUDA 13 driver) or tensorrt-cu12 "
                    "(CUDA 12), or pip install '.[trt]' from a checkout of resnet-export")


def unavailable_reason() -> str | None:
    """Why an engine cannot be built or run on this machine, naming each of TensorRT and a CUDA GPU that is missing
    (None when both are here)."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("TensorRT is not installed")
    gpu = device.current().unavailable_reason()
    if gpu:
        missing.append(gpu)
    if not missing:
        return None
    return " and ".join(missing) + (f" (TensorRT: {TENSORRT_INSTALL})" if "TensorRT" in missing[0] else "")


def require_tensorrt(what: str) -> None:
    """Raise TensorRTUnavailable (exit code 4) naming ``what`` could not be done, and why."""
    reason = unavailable_reason()
    if reason:
        raise TensorRTUnavailable(f"cannot {what}: {reason}")


#: (built major, running major) pairs across which a version-compatible plan runs.
VERSION_COMPATIBLE_MAJORS = {(10, 11), (8, 10)}


def incompatibility(built: dict, running: RuntimeInfo) -> str | None:
    """Why a plan built as ``built`` (its manifest) cannot run on ``running``, or None.

    A plan runs only on the OS and CPU architecture that built it (TensorRT developer guide, "Engine
    Portability": x86_64 and aarch64 plans differ even for GPUs of one compute capability); on the
    TensorRT version that built it or, built version-compatible, on a later release of the same major,
    or across exactly two major boundaries: 10 -> 11 and 8 -> 10 (TensorRT 11.4 support matrix); and
    on GPUs of the same compute capability or, built with hardware compatibility, any Ampere or newer.
    Another GPU model of the same compute capability is a caveat (``gpu_caveat``), not a refusal.
    """
    recorded = [field for field in ("tensorrt", "compute_capability", "platform") if not built.get(field)]
    if recorded:
        return f"its manifest does not record the {', '.join(recorded)} that built it"
    options = built.get("options", {})
    problems = []
    if built["platform"] != running.platform:
        problems.append("platform")
    built_trt, run_trt = built["tensorrt"], running.tensorrt
    if options.get("version_compatible"):
        built_v, run_v = _version(built_trt), _version(run_trt)
        majors = (built_v[:1] or (0,))[0], (run_v[:1] or (0,))[0]
        if run_v < built_v or (majors[0] != majors[1] and majors not in VERSION_COMPATIBLE_MAJORS):
            problems.append("TensorRT")
    elif built_trt != run_trt:
        problems.append("TensorRT")
    built_cc, run_cc = built["compute_capability"], running.compute_capability
    if options.get("hardware_compatible"):
        if _version(run_cc) < (8, 0):
            problems.append("GPU")
    elif built_cc != run_cc:
        problems.append("GPU")
    if not problems:
        return None
    return (
        f"built with TensorRT {built_trt} on compute capability {built_cc} ({built.get('gpu', '?')}, "
        f"{built['platform']}), running TensorRT {run_trt} on compute capability {run_cc} ({running.gpu}, "
        f"{running.platform}): {' and '.join(problems)} mismatch"
    )


def gpu_caveat(built: dict, running: RuntimeInfo) -> str | None:
    """A warning when a plan built without hardware compatibility runs on another GPU model of its compute
    capability: TensorRT promises such a plan only "the type of device where it was built" (developer
    guide, "Hardware Compatibility"); the same-compute-capability level (``SAME_COMPUTE_CAPABILITY``)
    came in 10.9. An L4 and an RTX 4090 are both 8.9."""
    if built.get("options", {}).get("hardware_compatible") or built.get("gpu") in (None, running.gpu):
        return None
    return (f"it was built on {built['gpu']} and runs on {running.gpu}: TensorRT guarantees a plan built without "
            "hardware compatibility only on the GPU model that built it; verify it here, or rebuild it here")


#: TensorRT I/O data types (``trt.DataType`` member names) and the torch dtypes used as their buffers.
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


def torch_dtype_name(trt_dtype_name: str, tensor: str) -> str:
    """The torch dtype name for a TensorRT I/O type, or a one-line error for types with no torch buffer."""
    if trt_dtype_name not in TORCH_DTYPES:
        raise EngineError(f"engine tensor '{tensor}' has data type {trt_dtype_name}, which this runner cannot "
                          f"feed (supported: {', '.join(TORCH_DTYPES)})")
    return TORCH_DTYPES[trt_dtype_name]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def engine_key(runtime: RuntimeInfo) -> str:
    """What a plan or timing cache is tied to, for file names: TensorRT version, GPU model and compute capability.

    The GPU model, not only its compute capability: ``setTimingCache`` refuses a cache made on another
    device whose properties differ (NvInfer.h, IBuilderConfig::setTimingCache), and an L4 and an RTX 4090
    are both 8.9; nor does TensorRT promise a plan to another model (``gpu_caveat``). The platform too.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", runtime.gpu.lower()).strip("-")
    return f"trt{runtime.tensorrt}-sm{runtime.compute_capability.replace('.', '')}-{gpu}-{runtime.platform}"


@dataclass(frozen=True)
class RuntimeInfo:
    """Where a plan is built or run: the fields every engine manifest starts with (``EngineBuild``).

    ``cuda_driver``: the CUDA version the installed driver supports (``cuDriverGetVersion`` of
    libcuda.so.1, what every CUDA library runs on); ``tensorrt_cuda``: the CUDA major the TensorRT
    wheel was built for (its distribution name, ``tensorrt-cu12`` / ``tensorrt-cu13``); torch's build
    CUDA is not TensorRT's and is not recorded as such. ``platform``: OS and CPU architecture
    (``linux-x86_64``, ``linux-aarch64``), which a plan is tied to.
    """

    tensorrt: str
    gpu: str
    compute_capability: str
    platform: str
    cuda_driver: str | None
    tensorrt_cuda: str | None


def runtime_info() -> RuntimeInfo:
    """The TensorRT, GPU, platform and CUDA of this machine."""
    import tensorrt as trt

    gpu, compute_capability = device.current().identity()
    return RuntimeInfo(tensorrt=trt.__version__, gpu=gpu, compute_capability=compute_capability,
                       platform=this_platform(), cuda_driver=cuda_driver_version(), tensorrt_cuda=tensorrt_cuda_major())


def this_platform() -> str:
    """OS and CPU architecture, as plans are tied to them: ``linux-x86_64``."""
    return f"{platform.system().lower()}-{platform.machine().lower()}"


def cuda_version_text(version: int) -> str:
    """CUDA's integer version (1000 * major + 10 * minor, e.g. 12080) as ``12.8``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def cuda_driver_version() -> str | None:
    """The CUDA version the driver supports (libcuda.so.1's ``cuDriverGetVersion``), or None without a driver."""
    import ctypes

    libcuda, version = device.libcuda(), ctypes.c_int()
    if libcuda is None or libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:  # CUDA_SUCCESS
        return None
    return cuda_version_text(version.value)


def tensorrt_cuda_major(distributions=None) -> str | None:
    """The CUDA major of the installed TensorRT wheel, from its name (``tensorrt-cu12`` -> ``12``), if any."""
    import re
    from importlib import metadata

    names = distributions if distributions is not None else [d.metadata["Name"] or "" for d in metadata.distributions()]
    for name in names:
        found = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_]libs)?", name.lower())
        if found:
            return found[1]
    return None


@functools.cache
def logger():
    """The process's one TensorRT logger, shared by every Builder and Runtime (Polygraphy's
    ``get_trt_logger``, backend/trt/util.py, keeps one the same way)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def load_manifest(plan: str | Path) -> dict | None:
    """The plan's sidecar manifest, or None when it has none."""
    path = manifest_path(plan)
    return json.loads(path.read_text()) if path.is_file() else None
