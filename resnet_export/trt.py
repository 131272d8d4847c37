"""TensorRT: availability, engine build, manifest checks and the engine runner.

TensorRT is imported lazily, only in the functions that need it, so everything else works without it.
Precision is not chosen here: TensorRT 11 removed the precision builder flags and calibrators, so the
engine is built strongly typed from an ONNX whose graph already carries FP16 casts or INT8 Q/DQ
nodes. ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is required for that on TensorRT 10 and
ignored on 11; no removed flag (FP16, INT8, calibrators) is ever set.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import device
from .errors import EXIT_TRT_UNAVAILABLE, ResnetExportError
from .manifest import atomic_output, manifest_path, sha256_file
from .progress import task

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- pure logic


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile of the batch axis; the spatial size comes from the ONNX."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def shapes(self, chw: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
        """min/opt/max input shapes for an input of ``chw``."""
        return {name: (batch, *chw) for name, batch in (("min", self.min), ("opt", self.opt), ("max", self.max))}


def check_profile(profile: BatchProfile, onnx_batch: int | None) -> BatchProfile:
    """Validate the batch profile against the ONNX's batch axis; a fixed batch pins all three."""
    if onnx_batch is not None:
        if {profile.min, profile.opt, profile.max} != {onnx_batch} and profile != BatchProfile():
            raise EngineError(
                f"the ONNX has a fixed batch of {onnx_batch}; `min_batch`, `opt_batch` and `max_batch` must all be "
                f"{onnx_batch} (or export with `batch` dynamic)"
            )
        return BatchProfile(onnx_batch, onnx_batch, onnx_batch)
    if not 1 <= profile.min <= profile.opt <= profile.max:
        raise EngineError(
            f"inconsistent batch profile min={profile.min} opt={profile.opt} max={profile.max}: "
            "need 1 <= `min_batch` <= `opt_batch` <= `max_batch`"
        )
    return profile


def onnx_io(path: str | Path) -> tuple[str, int | None, tuple[int, int, int]]:
    """Input name, fixed batch (None when dynamic) and (C, H, W) of an ONNX model's input."""
    from .onnx_graph import input_dims, load_onnx

    name, dims = input_dims(load_onnx(path, load_weights=False))
    if len(dims) != 4 or None in dims[1:]:
        raise EngineError(f"input '{name}' of {path} must be (N, C, H, W) with fixed C, H, W; got {dims}")
    return name, dims[0], tuple(dims[1:])


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


def profile_batch_sizes(min_batch: int, opt_batch: int, max_batch: int) -> list[int]:
    """Batch sizes to verify an engine at: its profile's smallest, tuned-for and largest, each once."""
    return sorted({min_batch, opt_batch, max_batch})


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


def read_timing_cache(path: str | Path | None) -> bytes:
    """The timing cache's bytes when the file exists, else empty (a new cache)."""
    if path is None or not Path(path).is_file():
        return b""
    return Path(path).read_bytes()


def write_timing_cache(path: str | Path, data: bytes) -> None:
    """Save a serialized timing cache atomically (parallel builds never see half a file)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def merge_timing_cache(path: str | Path, merge: Callable[[bytes], bytes | None]) -> None:
    """Write ``merge(what the file holds now)`` to the timing cache at ``path``, holding a lock throughout; a merge
    that returns None leaves the file as it is.

    As Polygraphy's EngineBytesFromNetwork saves a cache (backend/trt/loader.py: ``util.LockFile``, load,
    ``combine``, save) and NVIDIA's samples do (shared/utils/cacheUtils.h, ``updateTimingCacheFile``:
    exclusive lock, load, combine, serialize): a build that only wrote its own cache would drop the
    entries another build saved meanwhile. The lock is a POSIX advisory lock on ``PATH.lock``; reads need none because every
    write is a rename.
    """
    import fcntl

    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        merged = merge(read_timing_cache(path))
        if merged is not None:
            write_timing_cache(path, merged)


def engine_key(runtime: RuntimeInfo) -> str:
    """What a plan or timing cache is tied to, for file names: TensorRT version, GPU model and compute capability.

    The GPU model, not only its compute capability: ``setTimingCache`` refuses a cache made on another
    device whose properties differ (NvInfer.h, IBuilderConfig::setTimingCache), and an L4 and an RTX 4090
    are both 8.9; nor does TensorRT promise a plan to another model (``gpu_caveat``). The platform too.
    """
    gpu = re.sub(r"[^a-z0-9]+", "-", runtime.gpu.lower()).strip("-")
    return f"trt{runtime.tensorrt}-sm{runtime.compute_capability.replace('.', '')}-{gpu}-{runtime.platform}"


#: Tokens of TensorRT's "Format/Datatype" strings (engine inspector, DETAILED) and the precision each names;
#: bf16 before fp16, fp16 before "float" ("bfloat16", "Half"), as NVIDIA's formats spell them.
FORMAT_PRECISIONS = (("int8", "INT8"), ("fp8", "FP8"), ("bf16", "BF16"), ("bfloat16", "BF16"), ("fp16", "FP16"),
                     ("half", "FP16"), ("fp32", "FP32"), ("float", "FP32"), ("int32", "INT32"), ("int64", "INT64"),
                     ("bool", "BOOL"))


def format_precision(text: str) -> str:
    """The precision a TensorRT tensor format names (``Channel major FP16 format ...`` -> FP16); else the text."""
    lowered = text.lower()
    return next((name for token, name in FORMAT_PRECISIONS if token in lowered), text or "?")


def engine_layers(information: dict) -> list[dict] | None:
    """Each layer of an engine inspector's JSON (``get_engine_information``) as name, type, the precisions
    of its inputs and outputs, and its tactic; None for a plan built without DETAILED profiling
    verbosity, whose inspector lists layer names only (TensorRT developer guide, "Engine Inspector")."""
    layers = information.get("Layers", [])
    if not layers or not all(isinstance(layer, dict) for layer in layers):
        return None

    def precisions(tensors: list[dict]) -> list[str]:
        return [format_precision(t.get("Format/Datatype", "")) for t in tensors]

    def convolution(layer: dict) -> bool:
        kinds = {layer.get("ParameterType"), layer.get("ConvParameterType")} - {None}
        return "Convolution" in kinds if kinds else "Conv" in layer.get("LayerType", "")

    return [{"name": layer.get("Name", ""), "type": layer.get("LayerType", ""), "convolution": convolution(layer),
             "inputs": precisions(layer.get("Inputs", [])), "outputs": precisions(layer.get("Outputs", [])),
             "tactic": layer.get("TacticName") or layer.get("TacticValue") or ""} for layer in layers]


def convolution_precisions(layers: list[dict]) -> dict[str, int]:
    """How many convolution layers take each input precision: where the INT8 convs of a Q/DQ model show.

    A convolution is a layer whose inspector parameters are a convolution's: ``ParameterType`` "Convolution"
    (``CaskConvolution`` and its kin) or ``ConvParameterType`` "Convolution" (a fused ``ConvActPool``, the stem of
    NVIDIA's INT8 ResNet-18 example); the layer type itself only when the inspector gives no parameter types.
    """
    return dict(Counter(layer["inputs"][0] for layer in layers if layer["inputs"] and layer["convolution"]))


# --------------------------------------------------------------------------- TensorRT


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


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings besides the profile; none of them touches precision."""

    workspace_mib: int | None = None
    timing_cache: str | None = None
    builder_optimization_level: int | None = None
    version_compatible: bool = False
    hardware_compatible: bool = False
    #: FP32 layers may compute in TF32 (10 mantissa bits): TensorRT's default, trtexec's and Torch-TensorRT's;
    #: off here unless asked, so that an FP32 plan computes in FP32 (its gate is then FP32's).
    tf32: bool = False


@functools.cache
def logger():
    """The process's one TensorRT logger, shared by every Builder and Runtime (Polygraphy's
    ``get_trt_logger``, backend/trt/util.py, keeps one the same way)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _strongly_typed_network(builder, onnx_path: Path, logger):
    import tensorrt as trt

    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    if network is None:  # pyCore.cpp binds createNetworkV2, which returns nullptr on failure
        raise EngineError("TensorRT could not create a network definition (see the TensorRT log above)")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        nodes = "; ".join(f"node '{e.node_name()}' ({e.node_operator()}): {e.desc()}" for e in errors[:5])
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {len(errors)} error(s): {nodes}")
    return network, parser


@dataclass
class EngineBuild:
    """What built a plan and where it can run: the plan manifest's core (``to_dict``), one definition for the
    build, ``triton`` and the tests."""

    runtime: RuntimeInfo
    onnx: str
    onnx_sha256: str
    precision: dict
    profile: dict
    build_seconds: float
    options: dict
    io: list[dict]  # name, mode (input/output), dtype (trt.DataType name), shape (-1 where dynamic)

    def to_dict(self) -> dict:
        """The manifest's fields: the runtime's at the top level, then the build's."""
        record = asdict(self)
        return {**record.pop("runtime"), **record}


def build_engine(onnx_path: str | Path, output: str | Path, profile: BatchProfile = BatchProfile(),
                 options: BuildOptions | None = None) -> EngineBuild:
    """Build a strongly typed engine from ``onnx_path`` into ``output``; returns its build record.

    The caller writes the manifest (``engine_from_onnx`` adds the verification to it).
    """
    require_tensorrt(f"build {output}")
    import tensorrt as trt

    options = options or BuildOptions()

    from .onnx_graph import graph_precision

    onnx_path, output = Path(onnx_path), Path(output)
    input_name, onnx_batch, chw = onnx_io(onnx_path)
    profile = check_profile(profile, onnx_batch)
    builder = trt.Builder(logger())
    network, _parser = _strongly_typed_network(builder, onnx_path, logger())
    config = builder.create_builder_config()
    # TF32 is on by default (trtexec and Torch-TensorRT keep it); Polygraphy's CreateConfig clears it unless asked
    # (backend/trt/config.py). Off unless `tf32`, so FP32 layers compute in FP32; the manifest says which.
    if options.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    # Layer formats and tactics in the plan, so that `inspect` shows each layer's precision (Polygraphy's
    # CreateConfig defaults to DETAILED too; the default, LAYER_NAMES_ONLY, keeps names only).
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    shapes = profile.shapes(chw)
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(trt_profile)
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.builder_optimization_level is not None:
        config.builder_optimization_level = options.builder_optimization_level
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache = timing_cache_from(config, read_timing_cache(options.timing_cache), options.timing_cache)
    # IBuilderConfig::setTimingCache returns false when the cache was made by another TensorRT or GPU
    # (NvInfer.h); ignoring that would build without it and then overwrite the user's file.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError(f"timing cache {options.timing_cache} was made by another TensorRT version or GPU: "
                          "delete it or give another `timing_cache` path")
    start = time.perf_counter()
    with task(log, f"Building TensorRT engine {output.name}"):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    build_seconds = time.perf_counter() - start
    with atomic_output(output) as tmp:
        tmp.write_bytes(bytes(plan))
    if options.timing_cache:
        merge_timing_cache(options.timing_cache, functools.partial(_combined_cache, config, cache))
    return EngineBuild(
        runtime=runtime_info(),
        onnx=str(onnx_path),
        onnx_sha256=sha256_file(onnx_path),
        precision=graph_precision(onnx_path),
        profile={"input": input_name, **{k: list(v) for k, v in shapes.items()}},
        build_seconds=round(build_seconds, 2),
        options=asdict(options),
        io=network_io(network),
    )


def timing_cache_from(config, blob: bytes, path):
    """The ITimingCache of ``blob`` (empty: a new cache), or an EngineError when TensorRT cannot read it.

    TensorRT's answer to a blob it cannot read is not one thing: createTimingCache returns null (NVIDIA's samples,
    shared/utils/cacheUtils.cpp, check for it), the binding may raise (Polygraphy's loader guards the call), or a
    cache with none of the blob's entries comes back, which would let the build go on and overwrite the file. All
    three are refused, and the file is left as it is.
    """
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # the bindings raise their own types
        cache = None
    if cache is not None and blob:
        empty = bytes(config.create_timing_cache(b"").serialize())
        if bytes(cache.serialize()) == empty and blob != empty:
            cache = None  # a non-empty blob read as an empty cache: nothing of it was read
    if cache is None:
        raise EngineError(f"timing cache {path} cannot be read by this TensorRT: it is left as it is; delete it or "
                          "give another `timing_cache` path")
    return cache


def _combined_cache(config, cache, saved: bytes) -> bytes | None:
    """``cache`` with the entries of the ``saved`` bytes another build wrote meanwhile, serialized; None (the file is
    left as it is) when those cannot be read or merged."""
    if saved:
        try:
            other = timing_cache_from(config, saved, "on disk")
        except EngineError:
            other = None
        # ITimingCache::combine returns false when the other cache is from another TensorRT or GPU (NvInfer.h).
        if other is None or not cache.combine(other, ignore_mismatch=False):
            log.warning("the timing cache on disk could not be merged (another TensorRT or GPU wrote it, or it cannot "
                        "be read): it is left as it is and this build's timings are not saved")
            return None
    return bytes(cache.serialize())


def network_io(network) -> list[dict]:
    """The network's inputs and outputs as the manifest records them (what `triton` configs are made from)."""
    tensors = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    tensors += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    return [{"name": t.name, "mode": mode, "dtype": t.dtype.name, "shape": list(t.shape)} for mode, t in tensors]


def load_manifest(plan: str | Path) -> dict | None:
    """The plan's sidecar manifest, or None when it has none."""
    path = manifest_path(plan)
    return json.loads(path.read_text()) if path.is_file() else None


class TrtRunner:
    """A TensorRT plan as a Runner: numpy in, numpy out, device tensors (``device.current()``) as buffers.

    The manifest (``manifest``, else the plan's sidecar) is checked against this machine before
    deserializing, so a plan from another TensorRT version, GPU or platform fails with a clear message.
    Every execution context of the runner draws on one activation block (``scratch``): they all run in
    order on the runner's stream. ``cuda_graph=True`` captures the enqueue once per input shape, each
    in its own context with its own input and output buffers, and replays it.

    One runner may be called from several threads: a lock keeps each call's shape, addresses and
    enqueue together, since they share the context, its graphs and the activation block; calls run
    one after another on the runner's stream. For parallel inference, use one runner per thread.
    """

    def __init__(self, plan: str | Path, cuda_graph: bool = False, manifest: dict | None = None):
        require_tensorrt(f"run {plan}")
        import tensorrt as trt
        import torch

        plan = Path(plan)
        manifest = manifest or load_manifest(plan)
        self.plan, self.manifest = plan, manifest
        self.device = device.current()
        self.runtime = trt.Runtime(logger())
        if manifest is None:
            log.warning(f"{plan} has no manifest ({manifest_path(plan).name}): its TensorRT version, GPU and "
                        "platform are unchecked, and it may carry its own runtime code (a version-compatible "
                        "plan), which is allowed")
        else:
            running = runtime_info()
            problem = incompatibility(manifest, running)
            if problem:
                raise EngineError(f"{plan} cannot run here: {problem}; rebuild it here with: "
                                  f"resnet-export trt --onnx {manifest.get('onnx', 'MODEL.onnx')} -o {plan}")
            caveat = gpu_caveat(manifest, running)
            if caveat:
                log.warning(f"{plan}: {caveat}")
        if manifest is None or manifest.get("options", {}).get("version_compatible"):
            # A version-compatible plan carries its own runtime code; the runtime must be allowed to run it
            # before deserializing (sampleEngines.cpp). Without a manifest nothing says whether the plan is
            # one (trtexec --versionCompatible writes none): Polygraphy's EngineFromBytes
            # (backend/trt/loader.py) sets the flag for every plan it loads.
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {plan} (see the TensorRT log above)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._dtypes = {n: getattr(torch, torch_dtype_name(self.engine.get_tensor_dtype(n).name, n)) for n in names}
        # device_memory_size_v2: what one context needs, for every profile (pyCore.cpp binds getDeviceMemorySizeV2).
        # torch's CUDA blocks are 512-byte aligned, above the 256 bytes TensorRT asks of this memory.
        self.scratch = self.device.empty((max(1, self.engine.device_memory_size_v2),), torch.uint8)
        self.context = self._new_context()
        self.stream = self.device.new_stream()
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple[int, ...], tuple] = {}
        self._lock = threading.Lock()
        self.name = f"trt:{plan.name}"

    def _new_context(self):
        """An execution context on the shared ``scratch`` block.

        The default allocation (STATIC) gives every context a block of its own, sized for all profiles,
        so each captured shape would cost a full activation block. USER_MANAGED contexts take the
        memory they are given (NvInferRuntime.h, ExecutionContextAllocationStrategy); sharing one is
        safe because this runner's contexts never run at the same time: all enqueue and replay in
        order on ``self.stream``. ``set_device_memory(memory, size)`` is pyCore.cpp's binding of
        setDeviceMemoryV2.
        """
        import tensorrt as trt

        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:  # createExecutionContext returns nullptr, e.g. when device memory runs out
            raise EngineError("TensorRT could not create an execution context (see the TensorRT log above)")
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        return context

    def _bind(self, context, batch, shape: tuple[int, ...]):
        """Set the input shape and both addresses on ``context``; returns the new output tensor."""
        # setInputShape returns false for a shape outside the optimization profile (NvInferRuntime.h);
        # running anyway would read past the buffer or return the wrong rows.
        if not context.set_input_shape(self.input_name, shape):
            low, high = self.profile_min_batch, self.profile_max_batch
            raise EngineError(f"batch shape {list(shape)} is outside the engine's profile (batch {low} to {high})")
        out = self.device.empty(tuple(context.get_tensor_shape(self.output_name)), self._dtypes[self.output_name])
        # setTensorAddress returns false for a misaligned or null address (TensorRT wants 256-byte alignment).
        for name, tensor in ((self.input_name, batch), (self.output_name, out)):
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise EngineError(f"TensorRT refused the buffer address of '{name}' (it must be 256-byte aligned)")
        return out

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.device.handle(self.stream)):
            raise EngineError("TensorRT execution failed (see the TensorRT log above)")

    def enqueue(self, batch):
        """Queue a run of a device tensor on ``self.stream`` and return its output tensor without waiting.

        The output is complete once ``self.stream`` has reached this point: synchronize the stream, or
        make another stream wait on it, before reading it (``infer_device`` synchronizes). What the
        benchmark times with CUDA events recorded on ``self.stream``. The tensor returned belongs to
        the caller: with CUDA graphs it is a copy of the graph's buffer.
        """
        shape = tuple(batch.shape)
        with self._lock:
            # The input was made (and cast) on torch's current stream: order the engine's stream after it.
            self.device.follow_current(self.stream, batch)
            with self.device.on(self.stream):
                batch = self._engine_buffer(batch)
                if self.cuda_graph and shape in self._graphs:
                    graph, static_in, static_out = self._graphs[shape][1:]
                    static_in.copy_(batch)
                    self.device.replay(graph)
                    return static_out.clone()
                if self.cuda_graph:
                    return self._capture(batch, shape)
                out = self._bind(self.context, batch, shape)
                self._execute(self.context)
                return out

    def _engine_buffer(self, batch):
        """``batch`` as TensorRT may read it: the engine's input type, contiguous, and at a 256-byte aligned address
        (setTensorAddress refuses others, NvInferRuntime.h), so a view at an offset or a cast copy made by torch's
        host allocator is copied into a buffer of the device's own."""
        dtype = self._dtypes[self.input_name]
        if batch.dtype == dtype and batch.is_contiguous() and batch.data_ptr() % 256 == 0:
            return batch
        buffer = self.device.empty(tuple(batch.shape), dtype)
        buffer.copy_(batch)
        return buffer

    def infer_device(self, batch):
        """Run a tensor already on the device; returns the device output tensor, complete (no host copies)."""
        out = self.enqueue(batch)
        self.device.synchronize(self.stream)
        return out

    def _capture(self, batch, shape: tuple[int, ...]):
        """Run once and capture the enqueue for ``shape`` in a context and buffers of its own.

        As trtexec does (sampleInference.cpp), a run comes first (TensorRT finishes its lazy set-up
        outside the capture), and the capture is thread-local on the runner's stream
        (``CudaDevice.capture``): a potentially unsafe CUDA call of another thread, such as another
        model's runner allocating memory in a serving thread, neither breaks the capture nor fails.
        A failed capture turns CUDA graphs off for this runner: every shape runs plain enqueues from then on.
        """
        context = self._new_context()
        static_in = self.device.empty(shape, batch.dtype)
        static_in.copy_(batch)
        static_out = self._bind(context, static_in, shape)
        self._execute(context)
        try:
            graph = self.device.capture(self.stream, lambda: context.execute_async_v3(self.device.handle(self.stream)))
        except RuntimeError:
            graph = None
        if graph is not None:
            self._graphs[shape] = (context, graph, static_in, static_out)
        else:
            self.cuda_graph = False  # this engine cannot be captured: plain enqueues from now on
            log.warning("CUDA graph capture of the TensorRT enqueue failed: running without CUDA graphs")
        return static_out.clone()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_device(self.device.upload(batch)).float().cpu().numpy()

    def clone(self) -> TrtRunner:
        """Another runner of the same plan, with its own engine, contexts, activation block and stream."""
        return TrtRunner(self.plan, cuda_graph=self.cuda_graph, manifest=self.manifest)

    @property
    def input_chw(self) -> tuple[int, ...]:
        """The input's shape without the batch axis (C, H, W)."""
        return tuple(self.engine.get_tensor_shape(self.input_name))[1:]

    @property
    def profile_opt_batch(self) -> int:
        """The batch the engine's optimization profile was tuned for."""
        return self.engine.get_tensor_profile_shape(self.input_name, 0)[1][0]

    @property
    def profile_min_batch(self) -> int:
        """The smallest batch the engine's optimization profile accepts."""
        return self.engine.get_tensor_profile_shape(self.input_name, 0)[0][0]

    @property
    def profile_max_batch(self) -> int:
        """The largest batch the engine's optimization profile accepts."""
        return self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0]
