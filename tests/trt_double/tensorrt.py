"""A TensorRT double, for tests only: the part of ``tensorrt`` that resnet-export calls, computing with ONNX Runtime.

This is not TensorRT and measures nothing of it. It lets the toolkit's own TensorRT glue (profiles,
shapes, buffer addresses, stream handles, contexts, graph capture, timing caches, manifests) run end
to end on machines without TensorRT or a GPU. Its "plan" is a header and the ONNX itself; an
execution context reads its input from the address it was given, runs the ONNX on ONNX Runtime's
CPU provider (float16 QuantizeLinear rounded as the spec and TensorRT do, see ort_fixes) and writes
the output at the output address. Streams are the host streams of ``tests/trt_double/__init__.py``'s
``HostDevice``: a run enqueued on a stream that is capturing is recorded into the graph instead.

Every class, method, attribute, keyword and enum member here exists in the real bindings of
TensorRT 10.1, 10.16 and 11.4 (``tests/engine/test_trt_double.py`` holds it against them). Like TensorRT
11 it has no weak-typing API: no FP16/INT8 builder flags, no calibrators. Its version carries
``+double`` so that every manifest and report made with it says so.

It refuses what TensorRT refuses, each rule from NVIDIA's headers or samples:
- on 10.x a network created without ``STRONGLY_TYPED`` whose ONNX carries FP16 or Q/DQ types does not build
  (NvInfer.h, NetworkDefinitionCreationFlag::kSTRONGLY_TYPED; on 11.x the flag is ignored, typing always strong);
- tensor addresses and an execution context's device memory must be 256-byte aligned (NvInferRuntime.h,
  setTensorAddress: "The pointer must have at least 256-byte alignment"; setDeviceMemoryV2: "aligned with CUDA
  memory alignment");
- a timing-cache blob it cannot read gives no usable cache: by default ``None`` (samples' cacheUtils.cpp checks
  createTimingCache for nullptr); ``_UNREADABLE_TIMING_CACHE`` makes it raise (Polygraphy's loader guards the call
  with try/except) or return an empty cache instead, so the toolkit is held to all three;
- ``execute_async_v3`` queues the run on its stream: it runs when the stream is synchronized (HostDevice).
Its outputs carry TensorRT-sized rounding (``_ROUNDING``), the same for the same input, and its inspector names
layers as NVIDIA's does (``CaskConvolution``; ``ConvActPool`` for an INT8 stem conv fused with its pooling, as in
trt-engine-explorer's A100 QAT ResNet-18 example).
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys

import numpy as np

__version__ = "10.16.1.11+double"

_MAGIC = b"TRT-DOUBLE-PLAN\n"

#: What ``create_timing_cache`` does with a blob it cannot read: "null" (returns None), "raise" or "empty" (an empty
#: cache, as if the blob held nothing).
_UNREADABLE_TIMING_CACHE = "null"
#: Rounding an engine adds to its outputs against ONNX Runtime's, by the precision its ONNX carries: relative to each
#: logit for FP32 and FP16, one quantization step of the logits (largest |logit| / 127) for INT8.
_ROUNDING = {"fp32": 1e-6, "fp16": 1e-3, "int8": 1.0}
_ALIGNMENT = 256


class _Enum(enum.IntEnum):
    pass


class DataType(_Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    BF16 = 7
    INT64 = 8


class TensorIOMode(_Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(_Enum):
    DEBUG = 2
    TF32 = 6
    VERSION_COMPATIBLE = 15


class NetworkDefinitionCreationFlag(_Enum):
    STRONGLY_TYPED = 1


class ProfilingVerbosity(_Enum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class MemoryPoolType(_Enum):
    WORKSPACE = 0


class HardwareCompatibilityLevel(_Enum):
    NONE = 0
    AMPERE_PLUS = 1


class ExecutionContextAllocationStrategy(_Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class LayerInformationFormat(_Enum):
    ONELINE = 0
    JSON = 1


#: ONNX element types -> TensorRT data types.
_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
              2: DataType.UINT8, 16: DataType.BF16, 7: DataType.INT64}
_NUMPY_TYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
               DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def _precision(model) -> str:
    """The precision an ONNX's types carry: int8 with Q/DQ nodes, fp16 with float16/bfloat16 initializers or casts."""
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        return "int8"
    half = {10, 16}  # FLOAT16, BFLOAT16
    if any(i.data_type in half for i in model.graph.initializer) or any(
            a.name == "to" and a.i in half for n in model.graph.node if n.op_type == "Cast" for a in n.attribute):
        return "fp16"
    return "fp32"


class ILogger:
    class Severity(_Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE


class Logger(ILogger):
    def __init__(self, min_severity=ILogger.Severity.WARNING):
        self.min_severity = min_severity

    def log(self, severity, msg):
        if severity <= self.min_severity:
            print(f"[TensorRT double] {ILogger.Severity(severity).name}: {msg}", file=sys.stderr)


def _device() -> tuple[str, str]:
    """The device the double builds for and runs on: the toolkit's current one (as TensorRT uses the current CUDA device)."""
    from resnet_export.runtime import device

    return device.current().identity()


class IHostMemory:
    def __init__(self, data: bytes):
        self._data = data

    def __bytes__(self) -> bytes:
        return self._data

    @property
    def nbytes(self) -> int:
        return len(self._data)


class ITensor:
    def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...]):
        self.name, self.dtype, self.shape = name, dtype, shape


class INetworkDefinition:
    def __init__(self, flags: int):
        self._creation_flags = flags
        self._onnx: bytes | None = None
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]


def _tensors(model) -> tuple[list[ITensor], list[ITensor]]:
    initializers = {i.name for i in model.graph.initializer}

    def tensor(value) -> ITensor:
        dims = tuple(d.dim_value if d.dim_value else -1 for d in value.type.tensor_type.shape.dim)
        return ITensor(value.name, _ONNX_TYPES[value.type.tensor_type.elem_type], dims)

    return ([tensor(v) for v in model.graph.input if v.name not in initializers],
            [tensor(v) for v in model.graph.output])


class ParserError:
    def __init__(self, node_name: str, node_operator: str, desc: str):
        self._error = (node_name, node_operator, desc)

    def node_name(self) -> str:
        return self._error[0]

    def node_operator(self) -> str:
        return self._error[1]

    def desc(self) -> str:
        return self._error[2]


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger):
        self._network, self._logger = network, logger
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]

    def parse_from_file(self, model: str) -> bool:
        import onnx

        try:
            data = open(model, "rb").read()
            proto = onnx.load_from_string(data)
            onnx.checker.check_model(proto)
        except Exception as exc:  # what the real parser reports as an error, not an exception
            self._errors.append(ParserError("", "", f"cannot read {model}: {exc}"))
            return False
        self._network._onnx = data
        self._network._inputs, self._network._outputs = _tensors(proto)
        return True


class IOptimizationProfile:
    def __init__(self):
        self._shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min, opt, max) -> None:  # noqa: A002 - the real keyword names
        self._shapes[input] = (tuple(min), tuple(opt), tuple(max))


class ITimingCache:
    """Entries (one per conv and opt shape) tied to the TensorRT version and the device that made them."""

    def __init__(self, origin: list, entries: set[str]):
        self._origin, self._entries = origin, entries

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if input_cache._origin != self._origin and not ignore_mismatch:
            return False
        self._entries |= input_cache._entries
        return True

    def serialize(self) -> IHostMemory:
        return IHostMemory(json.dumps({"origin": self._origin, "entries": sorted(self._entries)}).encode())


class IBuilderConfig:
    def __init__(self):
        self._flags = {BuilderFlag.TF32}  # on by default, as in TensorRT
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.builder_optimization_level = 3
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
        self._profiles: list[IOptimizationProfile] = []
        self._pools: dict[MemoryPoolType, int] = {}
        self._cache: ITimingCache | None = None

    def set_flag(self, flag: BuilderFlag) -> None:
        self._flags.add(BuilderFlag(flag))

    def clear_flag(self, flag: BuilderFlag) -> None:
        self._flags.discard(BuilderFlag(flag))

    def get_flag(self, flag: BuilderFlag) -> bool:
        return BuilderFlag(flag) in self._flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self._pools[pool] = pool_size

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return ITimingCache([__version__, *_device()], set())
        try:
            saved = json.loads(data)
            return ITimingCache(saved["origin"], set(saved["entries"]))
        except (ValueError, KeyError, TypeError):
            if _UNREADABLE_TIMING_CACHE == "raise":
                raise RuntimeError("Failed to deserialize the timing cache") from None
            if _UNREADABLE_TIMING_CACHE == "empty":
                return ITimingCache([__version__, *_device()], set())
            return None  # createTimingCache returns null for a blob it cannot read

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache._origin != [__version__, *_device()] and not ignore_mismatch:
            return False
        self._cache = cache
        return True


class Builder:
    def __init__(self, logger: ILogger):
        self._logger = logger

    def create_network(self, flags=0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        import onnx

        name, cc = _device()
        inputs = {t.name for t in network._inputs}
        if network._onnx is None or len(config._profiles) != 1 or set(config._profiles[0]._shapes) != inputs:
            self._logger.log(ILogger.ERROR, "the network needs one optimization profile for its input")
            return None
        strongly_typed = network._creation_flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        typed = _precision(onnx.load_from_string(network._onnx))
        if __version__.startswith("10.") and not strongly_typed and typed != "fp32":
            self._logger.log(ILogger.ERROR, f"a weakly typed network (no STRONGLY_TYPED flag) cannot build the {typed} "
                             "types of this ONNX as typed: TensorRT 10 would run them in FP32")
            return None
        if config.hardware_compatibility_level == HardwareCompatibilityLevel.AMPERE_PLUS and int(cc.split(".")[0]) < 8:
            self._logger.log(ILogger.ERROR, f"hardware compatibility needs Ampere or newer, not compute capability {cc}")
            return None
        profile = config._profiles[0]._shapes
        if config._cache is not None:  # what the build tuned, at the opt shape
            opt = next(iter(profile.values()))[1]
            model = onnx.load_from_string(network._onnx)
            config._cache._entries |= {f"{n.name or n.output[0]}@{opt}" for n in model.graph.node if n.op_type == "Conv"}
        header = {"version": __version__, "gpu": name, "compute_capability": cc, "profile": profile,
                  "tf32": config.get_flag(BuilderFlag.TF32),
                  "version_compatible": config.get_flag(BuilderFlag.VERSION_COMPATIBLE),
                  "hardware_compatible": config.hardware_compatibility_level != HardwareCompatibilityLevel.NONE,
                  "detailed": config.profiling_verbosity == ProfilingVerbosity.DETAILED}
        return IHostMemory(_MAGIC + json.dumps(header).encode() + b"\n" + network._onnx)


class Runtime:
    def __init__(self, logger: ILogger):
        self._logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
        data = bytes(serialized_engine)
        if not data.startswith(_MAGIC):
            self._logger.log(ILogger.ERROR, "Magic tag does not match")
            return None
        header_line, onnx_bytes = data[len(_MAGIC):].split(b"\n", 1)
        header = json.loads(header_line)
        gpu, cc = _device()
        if header["version_compatible"] and not self.engine_host_code_allowed:
            self._logger.log(ILogger.ERROR, "the engine holds host code and engine_host_code_allowed is False")
            return None
        if header["version"] != __version__ and not header["version_compatible"]:
            self._logger.log(ILogger.ERROR, f"Version tag does not match: {header['version']} vs {__version__}")
            return None
        if header["compute_capability"] != cc and not header["hardware_compatible"]:
            self._logger.log(ILogger.ERROR, f"built for compute capability {header['compute_capability']}, this is {cc}")
            return None
        return ICudaEngine(header, onnx_bytes, self._logger)


class ICudaEngine:
    def __init__(self, header: dict, onnx_bytes: bytes, logger: ILogger):
        import onnx

        self._header, self._onnx, self._logger = header, onnx_bytes, logger
        self._model = onnx.load_from_string(onnx_bytes)
        inputs, outputs = _tensors(self._model)
        self._tensors = {t.name: (TensorIOMode.INPUT, t) for t in inputs}
        self._tensors.update({t.name: (TensorIOMode.OUTPUT, t) for t in outputs})
        self._session = None

    @property
    def num_io_tensors(self) -> int:
        return len(self._tensors)

    def get_tensor_name(self, index) -> str:
        return list(self._tensors)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._tensors[name][0] if name in self._tensors else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensors[name][1].dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][1].shape

    def get_tensor_profile_shape(self, name: str, profile_index) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self._header["profile"][name]]

    @property
    def device_memory_size_v2(self) -> int:
        """Activation memory a context needs: a made-up figure that grows with the profile's largest batch."""
        return (1 << 20) * max(s[2][0] for s in self._header["profile"].values())

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC) -> IExecutionContext:
        return IExecutionContext(self, ExecutionContextAllocationStrategy(strategy))

    def create_engine_inspector(self) -> EngineInspector:
        return EngineInspector(self)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """The ONNX on ONNX Runtime's CPU provider (float16 QuantizeLinear rounded as the spec says), with the
        rounding a real engine of its precision adds (``_ROUNDING``), drawn from the input: the same input, the same
        output."""
        if self._session is None:
            from resnet_export.runtime.runners import OrtRunner

            self._session = OrtRunner(self._onnx)
        out = self._session.session.run(None, {self._session.input_name: batch})[0]
        precision = _precision(self._model)
        rng = np.random.default_rng(np.frombuffer(np.ascontiguousarray(batch).tobytes()[:4096].ljust(8, b"\0"),
                                                  np.uint32)[:8])
        if precision == "int8":
            step = np.abs(out).max() / 127
            return (out + rng.uniform(-0.5, 0.5, out.shape) * step * _ROUNDING["int8"]).astype(out.dtype)
        return (out * (1 + _ROUNDING[precision] * rng.standard_normal(out.shape))).astype(out.dtype)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy: ExecutionContextAllocationStrategy):
        self._engine, self._strategy = engine, strategy
        self._memory: tuple[int, int] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}

    def set_device_memory(self, memory: int, size: int) -> None:
        if memory % _ALIGNMENT:
            self._engine._logger.log(ILogger.ERROR, f"device memory at {memory:#x} is not {_ALIGNMENT}-byte aligned")
            return
        if size < self._engine.device_memory_size_v2:
            self._engine._logger.log(ILogger.ERROR, f"device memory of {size} bytes is below the "
                                   f"{self._engine.device_memory_size_v2} the engine needs")
            return
        self._memory = (memory, size)

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(shape)
        mode, tensor = self._engine._tensors.get(name, (None, None))
        if mode != TensorIOMode.INPUT or len(shape) != len(tensor.shape):
            return False
        low, _, high = self._engine.get_tensor_profile_shape(name, 0)
        if any(not lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return False
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        mode, tensor = self._engine._tensors[name]
        if mode == TensorIOMode.INPUT:
            return self._shapes.get(name, tensor.shape)
        batch = next(iter(self._shapes.values()), (-1,))[0]
        return tuple(batch if d == -1 else d for d in tensor.shape)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self._engine._tensors or not memory or memory % _ALIGNMENT:
            return False
        self._addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        from . import HostStream

        stream = HostStream.find(stream_handle)
        problem = None
        if stream is None:
            problem = f"stream handle {stream_handle} is not a stream of this double's host device"
        elif self._strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self._memory is None:
            problem = "a USER_MANAGED context has no device memory (set_device_memory)"
        elif set(self._addresses) != set(self._engine._tensors) or not self._shapes:
            problem = "every input shape and every I/O address must be set before enqueueing"
        else:
            from resnet_export.runtime import device

            races = [device.current().race(stream, address) for address in
                     [*self._addresses.values(), *([self._memory[0]] if self._memory else [])]]
            problem = next((race for race in races if race), None)
        if problem:
            self._engine._logger.log(ILogger.ERROR, problem)
            return False
        # What the enqueue was given is what it runs with, whatever this context is set to before the stream gets there
        outputs = {name: self.get_tensor_shape(name) for name, (mode, _) in self._engine._tensors.items()
                   if mode == TensorIOMode.OUTPUT}
        stream.enqueue(self._job(dict(self._shapes), dict(self._addresses), outputs))
        return True

    def _job(self, shapes: dict, addresses: dict, outputs: dict):
        """Read the input at its address, run, write the output (of the shape it had at enqueue) at its address: what
        one enqueue does."""
        def run() -> None:
            (input_name, shape), = shapes.items()
            dtype = _NUMPY_TYPES[self._engine.get_tensor_dtype(input_name)]
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            batch = np.frombuffer(ctypes.string_at(addresses[input_name], size), dtype).reshape(shape)
            for name, (mode, tensor) in self._engine._tensors.items():
                if mode == TensorIOMode.OUTPUT:
                    out = np.ascontiguousarray(self._engine._run(batch), _NUMPY_TYPES[tensor.dtype])
                    assert out.shape == outputs[name], (out.shape, outputs[name])
                    ctypes.memmove(addresses[name], out.ctypes.data, out.nbytes)
        return run


class EngineInspector:
    """The engine's layers as TensorRT's inspector lists them: names only, or (DETAILED) with formats, which
    need a context whose input shapes are set (else "N/A due to dynamic shapes")."""

    def __init__(self, engine: ICudaEngine):
        self._engine = engine
        self.execution_context: IExecutionContext | None = None

    def get_engine_information(self, format: LayerInformationFormat) -> str:  # noqa: A002 - the real keyword
        import onnx

        nodes = [n for n in self._engine._model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
        bindings = list(self._engine._tensors)
        if not self._engine._header["detailed"]:
            return json.dumps({"Layers": [n.name for n in nodes], "Bindings": bindings})
        shapes_set = self.execution_context is not None and self.execution_context._shapes
        inferred = onnx.shape_inference.infer_shapes(self._engine._model)
        types = {v.name: v.type.tensor_type.elem_type for v in
                 list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
        producers = {out: n for n in self._engine._model.graph.node for out in n.output}

        def fmt(tensor: str) -> str:
            if not shapes_set:
                return "N/A due to dynamic shapes"
            if getattr(producers.get(tensor), "op_type", None) == "DequantizeLinear":
                return "Thirty-two wide channel vectorized row major Int8 format"
            return {10: "Channel major FP16 format where channel % 8 == 0"}.get(types.get(tensor), "Row major linear FP32")

        consumers = {}
        for node in self._engine._model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)

        def pooled(node) -> bool:  # an INT8 conv whose output (through its activation and Q/DQ) only feeds a MaxPool
            following = consumers.get(node.output[0], [])
            while len(following) == 1 and following[0].op_type in ("Relu", "QuantizeLinear", "DequantizeLinear"):
                following = consumers.get(following[0].output[0], [])
            return fmt(node.input[0]).endswith("Int8 format") and [n.op_type for n in following] == ["MaxPool"]

        def kind(node) -> dict:
            if node.op_type != "Conv":
                return {"LayerType": node.op_type, "ParameterType": node.op_type}
            if pooled(node):  # as NVIDIA's inspector reports a fused stem (trt-engine-explorer's QAT ResNet-18)
                return {"LayerType": "ConvActPool", "ParameterType": "ConvActPool", "ConvParameterType": "Convolution"}
            return {"LayerType": "CaskConvolution", "ParameterType": "Convolution"}

        layers = [{"Name": n.name, **kind(n),
                   "Inputs": [{"Name": i, "Format/Datatype": fmt(i)} for i in n.input[:1]],
                   "Outputs": [{"Name": o, "Format/Datatype": fmt(o)} for o in n.output],
                   "TacticName": "double_onnxruntime_cpu"} for n in nodes]
        return json.dumps({"Layers": layers, "Bindings": bindings})
