"""Building a plan: the network from an ONNX (strongly typed), the optimization profile, the timing cache, the
build record.

Precision is not chosen here: TensorRT 11 removed the precision builder flags and calibrators, so the
engine is built strongly typed from an ONNX whose graph already carries FP16 casts or INT8 Q/DQ
nodes. ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is required for that on TensorRT 10 and
ignored on 11; no removed flag (FP16, INT8, calibrators) is ever set.
"""

from __future__ import annotations
import functools
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
import numpy as np
from ..manifest import atomic_output, sha256_file
from ..progress import task
from .tensorrt import EngineError, RuntimeInfo, logger, require_tensorrt, runtime_info

log = logging.getLogger(__name__)


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
    from ..onnx_graph import input_dims, load_onnx

    name, dims = input_dims(load_onnx(path, load_weights=False))
    if len(dims) != 4 or None in dims[1:]:
        raise EngineError(f"input '{name}' of {path} must be (N, C, H, W) with fixed C, H, W; got {dims}")
    return name, dims[0], tuple(dims[1:])


def profile_batch_sizes(min_batch: int, opt_batch: int, max_batch: int) -> list[int]:
    """Batch sizes to verify an engine at: its profile's smallest, tuned-for and largest, each once."""
    return sorted({min_batch, opt_batch, max_batch})


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

    from ..onnx_graph import graph_precision

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
