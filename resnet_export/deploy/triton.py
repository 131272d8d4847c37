"""A Triton Inference Server model repository entry from an artifact: ONNX (onnxruntime or openvino backend) or plan.

The config is built as Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``,
the way Triton Model Navigator builds it: ``json_format.ParseDict`` then ``text_format``), parsed back
and checked against the artifact before anything is written. The rules it enforces are the ones
users trip on (Triton server issues #4445, #7056, #5013, #5866; onnxruntime_backend #165): with
``max_batch_size > 0`` dims leave out the batch axis and every input and output must have a dynamic
dim 0; a fixed-batch model gets ``max_batch_size: 0`` and full dims; a plan's ``max_batch_size`` stays
inside its profile and runs on a GPU instance of its compute capability.

A plan is served as it was built (its manifest says how): one tied to its GPU is ``model.<cc>.plan``,
named only under ``cc_model_filenames``, so that Triton on another GPU finds no file instead of
falling back to the default name (``BackendModelInstance`` takes ``default_model_filename`` unless
the GPU's compute capability is in the map; the TensorRT backend then defaults to ``model.plan``);
a version-compatible one loads only when the server runs with
``--backend-config=tensorrt,version-compatible=true`` (tensorrt_backend README; loader.cc calls
``setEngineHostCodeAllowed`` only then), which no config.pbtxt can say: its README and a warning do.

An ONNX can also be served by Triton's openvino backend, the CPU peer for a CPU-target INT8 model: it runs on
CPU instances only, reads ONNX when ``default_model_filename`` is ``model.onnx`` (its default is ``model.xml``),
and takes OpenVINO's compile settings from ``parameters`` (openvino_backend README, "Parameters" and "Loading
non default model format"; src/openvino.cc reads only the keys it knows, so the preprocessing keys pass). Its
config is checked against the model as OpenVINO reads it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ResnetExportError
from ..engine.build import BatchProfile

log = logging.getLogger(__name__)

#: ONNX TensorProto element types and TensorRT DataType names -> Triton data types.
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 3: "TYPE_INT8", 2: "TYPE_UINT8", 6: "TYPE_INT32",
              7: "TYPE_INT64", 9: "TYPE_BOOL"}
TRT_TYPES = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT8": "TYPE_INT8", "UINT8": "TYPE_UINT8",
             "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL"}
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
#: The Triton backends that serve an ONNX; a plan is served by the tensorrt backend.
ONNX_BACKENDS = ("onnxruntime", "openvino")
#: OpenVINO's compile settings in an openvino-backend entry: the LATENCY hint and one stream, as `bench` and
#: `predict` compile it (openvino_backend README, "Latency mode").
OPENVINO_PARAMETERS = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
#: OpenVINO element types -> Triton data types (the openvino-backend check reads the model through OpenVINO).
OPENVINO_TYPES = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "bf16": "TYPE_BF16", "i8": "TYPE_INT8", "u8": "TYPE_UINT8",
                  "i32": "TYPE_INT32", "i64": "TYPE_INT64", "boolean": "TYPE_BOOL"}
#: A dynamic ONNX's max_batch_size unless given: the largest batch of `trt`'s default profile, one default for both.
DEFAULT_MAX_BATCH = BatchProfile().max
#: The server option without which Triton's TensorRT backend refuses a version-compatible plan (tensorrt_backend README).
VERSION_COMPATIBLE_FLAG = "--backend-config=tensorrt,version-compatible=true"


class TritonError(ResnetExportError):
    """A model repository entry cannot be made as asked."""


@dataclass(frozen=True)
class TritonRequest:
    """How to serve the artifact: repository entry name and version, batching, instances, accelerator."""

    name: str | None = None
    version: int = 1
    max_batch: int | None = None  # default: the plan's profile maximum, 32 for a dynamic ONNX (DEFAULT_MAX_BATCH)
    instances: int = 1
    kind: str = "auto"
    max_queue_delay_us: int = 100
    preferred_batch: tuple[int, ...] = ()
    ort_trt: bool = False
    labels: Path | None = None
    force: bool = False
    backend: str = "onnxruntime"  # for an ONNX: onnxruntime or openvino
    allow_failed: bool = False  # serve an artifact whose manifest says it failed its gate (``checks.serving.check_served``)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TritonError(f"unknown instance kind '{self.kind}'; choose one of {', '.join(KINDS)}")
        if self.backend not in ONNX_BACKENDS:
            raise TritonError(f"unknown backend '{self.backend}'; choose one of {', '.join(ONNX_BACKENDS)}")
        if self.version < 1 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise TritonError("`version` and `instances` must be positive and `max_queue_delay_us` not negative")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise TritonError(f"model name '{self.name}' may hold letters, digits, '_', '.' and '-' only")


@dataclass
class Tensor:
    """One model input or output as Triton sees it: full dims, None where dynamic."""

    name: str
    data_type: str
    dims: list[int | None]


@dataclass
class Served:
    """What the artifact is, as far as Triton is concerned."""

    kind: str  # "onnx" | "plan"
    inputs: list[Tensor]
    outputs: list[Tensor]
    precision: str
    preprocessing: dict | None
    class_names: list[str] | None
    profile: dict | None = None  # a plan's: input name, min/opt/max shapes
    build: dict = field(default_factory=dict)  # a plan's: tensorrt, gpu, compute_capability, options

    @property
    def fixed_batch(self) -> int | None:
        """A plan's batch when its profile pins it (min = max), else None."""
        if not self.profile or self.profile["min"][0] != self.profile["max"][0]:
            return None
        return self.profile["min"][0]

    @property
    def model_filename(self) -> str:
        """The file name in the version folder: ``model.<cc>.plan`` for a plan tied to its compute capability."""
        if self.kind == "onnx":
            return "model.onnx"
        cc = self.build.get("compute_capability")
        if not cc or self.build.get("options", {}).get("hardware_compatible"):
            return "model.plan"
        return f"model.{cc}.plan"


@dataclass
class TritonResult:
    """The repository entry written: its folder, config text and settings that were derived."""

    model_dir: Path
    config: str
    max_batch_size: int
    labels: int
    backend: str = "onnxruntime"


def sanitize(stem: str) -> str:
    """A model name from a file stem: characters Triton and file systems both accept."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).strip(".") or "model"


def describe_artifact(artifact: Path) -> Served:
    """The I/O, precision, preprocessing and class names of an ONNX file, or of a plan from its manifest."""
    if not artifact.is_file():
        raise TritonError(f"{artifact} not found")
    if artifact.suffix == ".onnx":
        return _describe_onnx(artifact)
    if artifact.suffix in (".plan", ".engine"):
        return _describe_plan(artifact)
    raise TritonError(f"{artifact}: expected an .onnx file or a TensorRT .plan")


def _describe_onnx(path: Path) -> Served:
    import onnx

    from ..onnx_graph import graph_inputs, graph_precision, load_onnx, read_metadata

    model = load_onnx(path, load_weights=False)

    def tensors(values) -> list[Tensor]:
        out = []
        for v in values:
            elem = v.type.tensor_type.elem_type
            if elem not in ONNX_TYPES:
                raise TritonError(f"{path}: tensor '{v.name}' has type {onnx.TensorProto.DataType.Name(elem)}, "
                                  "which has no Triton type here")
            out.append(Tensor(v.name, ONNX_TYPES[elem], [d.dim_value or None for d in v.type.tensor_type.shape.dim]))
        return out

    meta = read_metadata(model)
    preprocessing = meta.get("preprocessing")
    return Served("onnx", tensors(graph_inputs(model)), tensors(model.graph.output),
                  graph_precision(model)["dtype"], preprocessing,
                  (preprocessing or {}).get("class_names"))


def plan_tensors(manifest: dict) -> tuple[list[Tensor], list[Tensor]]:
    """A plan's inputs and outputs from its manifest's ``io`` (as TensorRT reported them at build), with
    the batch of an input whose profile pins it (min = max) in place of its dynamic batch axis."""
    profile = manifest.get("profile") or {}
    pinned = profile["min"][0] if profile and profile["min"][0] == profile["max"][0] else None

    def tensor(record: dict) -> Tensor:
        dims = [d if d >= 0 else None for d in record["shape"]]
        if record["mode"] == "input" and record["name"] == profile.get("input") and dims and dims[0] is None:
            dims[0] = pinned
        return Tensor(record["name"], TRT_TYPES.get(record["dtype"], record["dtype"]), dims)

    io = manifest.get("io", [])
    return tuple([tensor(t) for t in io if t["mode"] == mode] for mode in ("input", "output"))


def _describe_plan(path: Path) -> Served:
    from ..onnx_graph import read_metadata
    from ..engine.tensorrt import load_manifest

    manifest = load_manifest(path)
    if not manifest or "io" not in manifest or "profile" not in manifest:
        raise TritonError(f"{path} has no engine manifest with its I/O and profile ({path.name}.json, written by "
                          "`resnet-export trt`): its config cannot be derived")
    unknown = sorted({t["dtype"] for t in manifest["io"]} - set(TRT_TYPES))
    if unknown:
        raise TritonError(f"{path}: tensor types {', '.join(unknown)} have no Triton type here")
    inputs, outputs = plan_tensors(manifest)
    source = Path(manifest.get("onnx", ""))
    preprocessing = read_metadata(source).get("preprocessing") if source.is_file() else None
    if preprocessing is None:
        log.warning(f"{path}: the ONNX it was built from ({source}) is gone: no preprocessing in the config")
    build = {key: manifest.get(key) for key in ("tensorrt", "gpu", "compute_capability")}
    return Served("plan", inputs, outputs, manifest.get("precision", {}).get("dtype", "fp32"), preprocessing,
                  (preprocessing or {}).get("class_names"), manifest["profile"],
                  {**build, "options": manifest.get("options") or {}})


def build_config(served: Served, name: str, request: TritonRequest, class_names: list[str] | None) -> tuple[str, int]:
    """The config.pbtxt text for ``served`` and its max_batch_size; raises on any rule it would break."""
    max_batch = _max_batch(served, request)
    kind = KINDS[request.kind]
    backend = _backend(served, request)
    if served.kind == "plan":
        if request.kind == "cpu":
            raise TritonError("a TensorRT plan runs on a GPU instance only: use `kind` gpu or auto")
        kind = "KIND_GPU"
    if backend == "openvino":
        if request.kind == "gpu":
            raise TritonError("Triton's openvino backend runs on CPU instances only: use `kind` cpu or auto")
        kind = "KIND_CPU"
    if request.ort_trt and (backend != "onnxruntime" or request.kind == "cpu"):
        raise TritonError("`ort_trt` is ONNX Runtime's TensorRT accelerator for an ONNX on a GPU instance")
    for size in request.preferred_batch:
        if not 1 <= size <= max_batch:
            raise TritonError(f"preferred batch size {size} is outside 1..max_batch_size {max_batch}")

    def io(tensor: Tensor, label: bool = False) -> dict:
        dims = tensor.dims[1:] if max_batch > 0 else tensor.dims
        entry = {"name": tensor.name, "data_type": tensor.data_type, "dims": [-1 if d is None else d for d in dims]}
        if label:
            entry["label_filename"] = "labels.txt"
        return entry

    config = {
        "name": name,
        "backend": backend,
        "max_batch_size": max_batch,
        "input": [io(t) for t in served.inputs],
        "output": [io(t, label=bool(class_names) and i == 0) for i, t in enumerate(served.outputs)],
        "instance_group": [{"count": request.instances, "kind": kind}],
        "version_policy": {"specific": {"versions": [request.version]}},
    }
    if max_batch > 0:
        batching = {"max_queue_delay_microseconds": request.max_queue_delay_us}
        if request.preferred_batch:
            batching["preferred_batch_size"] = list(request.preferred_batch)
        config["dynamic_batching"] = batching
    config["model_warmup"] = [_warmup(served, size, max_batch) for size in sorted({1, max(max_batch, 1)})]
    if served.kind == "plan" and served.model_filename == "model.plan":
        config["default_model_filename"] = "model.plan"  # hardware-compatible (or of unknown GPU): any GPU
    elif served.kind == "plan":  # only this compute capability: no default file to fall back to
        config["cc_model_filenames"] = {served.build["compute_capability"]: served.model_filename}
    if request.ort_trt:
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": _ort_trt_parameters(served, max_batch)}]}}
    parameters = {}
    if backend == "openvino":
        config["default_model_filename"] = served.model_filename
        parameters.update({key: {"string_value": value} for key, value in OPENVINO_PARAMETERS.items()})
    if served.preprocessing:
        parameters.update({f"preprocessing_{k}": {"string_value": v if isinstance(v, str) else json.dumps(v)}
                           for k, v in served.preprocessing.items() if k != "class_names"})
    if parameters:
        config["parameters"] = parameters
    return _render(config), max_batch


def _backend(served: Served, request: TritonRequest) -> str:
    """The Triton backend that serves ``served``: tensorrt for a plan, the request's for an ONNX."""
    if served.kind == "plan":
        if request.backend != "onnxruntime":
            raise TritonError(f"a TensorRT plan is served by Triton's tensorrt backend, not {request.backend}")
        return "tensorrt"
    return request.backend


def _max_batch(served: Served, request: TritonRequest) -> int:
    """max_batch_size: 0 for a fixed batch; else the request's, bounded by a plan's profile."""
    dynamic = all(t.dims and t.dims[0] is None for t in served.inputs + served.outputs)
    if served.kind == "plan":
        low, high = served.profile["min"][0], served.profile["max"][0]
        if served.fixed_batch and served.fixed_batch > 1:  # Triton's TensorRT backend: full dims, no batcher
            if request.max_batch:
                raise TritonError(f"the plan's profile is fixed at batch {low}: it is served with max_batch_size 0 "
                                  "(no `max_batch`)")
            return 0
        if low > 1:
            raise TritonError(f"the plan's profile starts at batch {low}; Triton's batcher sends batches from 1: "
                              "rebuild with `min_batch` 1, or pin the profile (min = opt = max) to serve it "
                              "without batching")
        chosen = high if request.max_batch is None else request.max_batch
        if chosen > high:
            raise TritonError(f"`max_batch` {chosen} is above the plan's profile maximum {high}")
        return chosen
    if not dynamic:
        if request.max_batch:
            raise TritonError("the ONNX has a fixed batch: it is served with max_batch_size 0 (no `max_batch`)")
        return 0
    return DEFAULT_MAX_BATCH if request.max_batch is None else request.max_batch


def _warmup(served: Served, size: int, max_batch: int) -> dict:
    inputs = {}
    for t in served.inputs:
        dims = t.dims[1:] if max_batch > 0 else [d or 1 for d in t.dims]
        inputs[t.name] = {"data_type": t.data_type, "dims": dims, "zero_data": True}
    return {"name": f"zeros_batch_{size}", "batch_size": size, "inputs": inputs}


def _ort_trt_parameters(served: Served, max_batch: int) -> dict:
    """onnxruntime_backend's TensorRT accelerator keys (its README's mapping table) for this ONNX."""
    mode = {"fp16": "FP16", "int8": "INT8"}.get(served.precision, "FP32")
    params = {"precision_mode": mode, "trt_engine_cache_enable": "1", "trt_timing_cache_enable": "1"}
    if max_batch > 0:
        shapes = {}
        for label, batch in (("min", 1), ("opt", max_batch), ("max", max_batch)):
            shapes[label] = ",".join(f"{t.name}:{batch}x" + "x".join(str(d) for d in t.dims[1:]) for t in served.inputs)
        params.update(trt_profile_min_shapes=shapes["min"], trt_profile_opt_shapes=shapes["opt"],
                      trt_profile_max_shapes=shapes["max"])
    return params


def _render(config: dict) -> str:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    text = text_format.MessageToString(message)
    if config["max_batch_size"] == 0:  # proto3 drops zero values; Triton reads a missing one as 0, say it
        text = f"max_batch_size: 0\n{text}"
    return text


#: ONNX Runtime's type strings -> Triton data types (the check reads the artifact through ONNX Runtime).
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(bfloat16)": "TYPE_BF16",
             "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8", "tensor(int32)": "TYPE_INT32",
             "tensor(int64)": "TYPE_INT64", "tensor(bool)": "TYPE_BOOL"}


def artifact_tensors(artifact: Path, backend: str = "onnxruntime") -> tuple[list[Tensor], list[Tensor]]:
    """The inputs and outputs the served runtime will see, read apart from ``describe_artifact``.

    An ONNX is read by the runtime of the backend that serves it, ONNX Runtime or OpenVINO (what Triton's
    backend loads); a plan by its manifest's ``io`` records, as TensorRT reported them when it built the plan
    (``plan_tensors``).
    """
    if artifact.suffix == ".onnx" and backend == "openvino":
        import openvino as ov

        model = ov.Core().read_model(str(artifact))

        def ov_tensors(ports) -> list[Tensor]:
            return [Tensor(p.get_any_name(), OPENVINO_TYPES.get(p.get_element_type().get_type_name(),
                                                                 p.get_element_type().get_type_name()),
                           [d.get_length() if d.is_static else None for d in p.get_partial_shape()]) for p in ports]

        return ov_tensors(model.inputs), ov_tensors(model.outputs)
    if artifact.suffix == ".onnx":
        from ..runtime.runners import OrtRunner

        session = OrtRunner(artifact).session

        def tensors(values) -> list[Tensor]:
            return [Tensor(v.name, ORT_TYPES.get(v.type, v.type), [d if isinstance(d, int) else None for d in v.shape])
                    for v in values]

        return tensors(session.get_inputs()), tensors(session.get_outputs())
    from ..engine.tensorrt import load_manifest

    return plan_tensors(load_manifest(artifact) or {})


def check_config(text: str, artifact: Path, name: str, max_batch: int) -> None:
    """Parse ``text`` back into ModelConfig and check it against the artifact itself; raise on any disagreement.

    The artifact is read again (``artifact_tensors``, by the runtime of the config's backend), not through the
    description the config was made from.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonError(f"the generated config does not parse as Triton's ModelConfig: {exc}") from exc
    inputs, outputs = artifact_tensors(artifact, config.backend)
    problems = []
    if config.backend == "openvino" and config.default_model_filename != "model.onnx":
        problems.append("the openvino backend reads an ONNX only as default_model_filename model.onnx")
    if config.backend == "openvino" and any(g.kind != model_config_pb2.ModelInstanceGroup.KIND_CPU
                                            for g in config.instance_group):
        problems.append("the openvino backend runs on CPU instances only")
    if config.name != name:
        problems.append(f"name {config.name} != folder {name}")
    if config.max_batch_size != max_batch:
        problems.append(f"max_batch_size {config.max_batch_size} != {max_batch}")
    for declared, tensors in ((config.input, inputs), (config.output, outputs)):
        if [(t.name, model_config_pb2.DataType.Name(t.data_type)) for t in declared] != \
                [(t.name, t.data_type) for t in tensors]:
            problems.append("tensor names or types differ from the artifact")
        for entry, tensor in zip(declared, tensors):
            dims = tensor.dims[1:] if config.max_batch_size > 0 else tensor.dims
            if list(entry.dims) != [-1 if d is None else d for d in dims]:
                problems.append(f"dims of '{tensor.name}' differ from the artifact")
    if config.max_batch_size > 0 and artifact.suffix == ".onnx" and \
            not all(t.dims and t.dims[0] is None for t in inputs + outputs):
        problems.append("batching needs a dynamic dim 0 on every input and output")
    if problems:
        raise TritonError("the generated config disagrees with the artifact: " + "; ".join(problems))


def triton_entry(artifact: str | Path, repo: str | Path, request: TritonRequest = TritonRequest()) -> TritonResult:
    """Write ``repo/NAME/config.pbtxt``, ``repo/NAME/VERSION/model.onnx|model.plan``, labels and a README.

    Everything is validated first and staged beside its destination, then renamed into place: a
    failure leaves the repository as it was. An existing version is replaced only with ``force``.
    """
    from ..checks.serving import check_served

    artifact, repo = Path(artifact), Path(repo)
    check_served(artifact, request.allow_failed)
    served = describe_artifact(artifact)
    request = _verified_backend(artifact, request)
    name = request.name or sanitize(artifact.stem)
    class_names = _labels(request.labels) if request.labels else served.class_names
    text, max_batch = build_config(served, name, request, class_names)
    check_config(text, artifact, name, max_batch)
    model_dir = repo / name
    version_dir = model_dir / str(request.version)
    if version_dir.exists() and not request.force:
        raise TritonError(f"{version_dir} exists: pass `force` to replace it")
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TritonError(f"repository {repo} cannot be created ({exc.strerror})") from exc
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        (staging / str(request.version)).mkdir()
        model_file = staging / str(request.version) / served.model_filename
        backend = _backend(served, request)
        rewritten = _write_as_spec_rounds(artifact, model_file) if backend == "onnxruntime" else 0
        if not rewritten:
            shutil.copyfile(artifact, model_file)
        (staging / "config.pbtxt").write_text(text)
        if class_names:
            (staging / "labels.txt").write_text("\n".join(class_names) + "\n")
        (staging / "README.md").write_text(_readme(name, served, max_batch, bool(class_names), rewritten, backend))
        _move_into_place(staging, model_dir, str(request.version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if served.build.get("options", {}).get("version_compatible"):
        log.warning(f"{artifact.name} is version-compatible: Triton loads it only when tritonserver runs with "
                    f"{VERSION_COMPATIBLE_FLAG} (see {model_dir / 'README.md'})")
    return TritonResult(model_dir, text, max_batch, len(class_names or []), backend)


def _verified_backend(artifact: Path, request: TritonRequest) -> TritonRequest:
    """``request``, served by Triton's onnxruntime backend instead of openvino when OpenVINO was not verified to
    serve this CPU-target INT8 ONNX on this CPU class (``checks.serving.openvino_verified_here``), with a warning."""
    from dataclasses import replace

    from ..checks.serving import cpu_int8, openvino_verified_here

    if request.backend != "openvino" or artifact.suffix != ".onnx" or not cpu_int8(artifact):
        return request
    verified, why = openvino_verified_here(artifact)
    if verified:
        log.info(f"{artifact.name}: {verified}")
        return request
    log.warning(f"{artifact.name}: not served by Triton's openvino backend: {why}; writing an onnxruntime entry")
    return replace(request, backend="onnxruntime")


def _rewrite_note(rewritten: int) -> str:
    if not rewritten:
        return ""
    return (f"\n- model.onnx is the artifact with its {rewritten} float16 QuantizeLinear computed in float32: plain "
            "ONNX Runtime truncates them (onnxruntime#18576), TensorRT and the spec round half to even")


def _write_as_spec_rounds(artifact: Path, destination: Path) -> int:
    """Write ``artifact`` with its float16 QuantizeLinear computed in float32, if it has any; how many.

    Triton's onnxruntime backend is plain ONNX Runtime, whose float16 QuantizeLinear truncates (see
    ort_fixes): a TensorRT-target INT8 model with the rest in FP16 would compute another model there.
    The rewrite (an exact cast and scale) makes it compute what TensorRT computes, on CPU and GPU alike.
    """
    import onnx

    from ..runtime.ort_fixes import fp16_quantize_nodes, quantize_in_fp32

    model = onnx.load(str(artifact))
    if not fp16_quantize_nodes(model):
        return 0
    rewritten = quantize_in_fp32(model)
    onnx.save(model, str(destination))
    log.info(f"{artifact.name}: {rewritten} float16 QuantizeLinear computed in float32 in the served model.onnx, "
             "so ONNX Runtime rounds them as TensorRT does")
    return rewritten


def _move_into_place(staging: Path, model_dir: Path, version: str) -> None:
    """A new model folder is one rename; into an existing one the version folder and each file are renamed."""
    if not model_dir.exists():
        os.rename(staging, model_dir)
        return
    old = model_dir / version
    if old.exists():
        os.rename(old, staging / f"replaced-{version}")
    os.rename(staging / version, model_dir / version)
    for item in ("config.pbtxt", "labels.txt", "README.md"):
        if (staging / item).exists():
            os.replace(staging / item, model_dir / item)


def _labels(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise TritonError(f"labels file {path} cannot be read ({exc.strerror})") from exc
    if not names:
        raise TritonError(f"labels file {path} is empty")
    return names


def _plan_notes(served: Served, max_batch: int) -> str:
    """Where the plan runs, said for the person who starts the server: TensorRT version, GPU, batch."""
    if served.kind != "plan":
        return ""
    build, options = served.build, served.build.get("options", {})
    version, cc = build.get("tensorrt") or "?", build.get("compute_capability") or "?"
    lines = [f"\n## Serving this plan\n\nBuilt with TensorRT {version} on {build.get('gpu') or '?'} (compute capability {cc}).\n"]
    if options.get("version_compatible"):
        lines.append(f"- Version-compatible: it runs on a Triton whose TensorRT is {version} or a later release that "
                     "reads it (same major; 10 -> 11 and 8 -> 10 across majors), but Triton's TensorRT backend loads "
                     f"it only when the server starts with `{VERSION_COMPATIBLE_FLAG}` (a server option: config.pbtxt "
                     "cannot carry it). The plan embeds a lean TensorRT runtime that the server then executes: serve "
                     "only plans you trust this way.\n\n  ```\n  tritonserver --model-repository=REPO "
                     f"{VERSION_COMPATIBLE_FLAG}\n  ```")
    else:
        lines.append(f"- Runs only on a Triton built with TensorRT {version} exactly (each Triton release names its "
                     "TensorRT); for another, rebuild the plan there, or build it with `--version-compatible`.")
    if served.model_filename == "model.plan":
        lines.append("- Hardware-compatible (Ampere and newer): `model.plan` is the default file, for any GPU of "
                     "compute capability 8.0 or above.")
    else:
        lines.append(f"- Runs only on GPUs of compute capability {cc}: the file is `{served.model_filename}` and only "
                     "`cc_model_filenames` names it, so on another GPU Triton looks for the default `model.plan` and "
                     "fails to load the model (\"unable to find .../model.plan\") instead of running a plan that "
                     "does not fit. Build one plan per GPU kind and add each to the map, or build with "
                     "`--hardware-compat`.")
    if max_batch == 0:
        lines.append(f"- Its profile is fixed at batch {served.fixed_batch}: served with `max_batch_size: 0`, every "
                     f"request carries exactly {served.fixed_batch} images.")
    return "\n".join(lines) + "\n"


def _readme(name: str, served: Served, max_batch: int, labels: bool, rewritten: int = 0,
            backend: str = "onnxruntime") -> str:
    spec = served.preprocessing or {}
    size = spec.get("input_size", ["H", "W"])
    interpolation = spec.get("interpolation", "bilinear")  # as image_stream.load_image resamples
    tensor_in, tensor_out = served.inputs[0], served.outputs[0]
    classification = (f'    outputs = [grpcclient.InferRequestedOutput("{tensor_out.name}", class_count=5)]\n'
                      if labels else f'    outputs = [grpcclient.InferRequestedOutput("{tensor_out.name}")]\n')
    printing = ("    for entry in result.as_numpy(\"{0}\")[0]:  # b\"score:index:label\"\n        print(entry.decode())\n"
                if labels else "    print(result.as_numpy(\"{0}\")[0].argsort()[::-1][:5])\n").format(tensor_out.name)
    fixed = tensor_in.dims[0] if max_batch == 0 and tensor_in.dims and tensor_in.dims[0] else 1
    batching = ('preprocess("image.jpg")[None]  # a batch of one' if fixed == 1 else
                f'np.stack([preprocess("image.jpg")] * {fixed})  # the model takes exactly {fixed} images')
    return f"""# {name}

Made by `resnet-export triton` ({served.kind}, {served.precision}, Triton's {backend} backend). Triton does not preprocess: send
what the model takes, preprocessed as below (also in `config.pbtxt` `parameters`).

- input `{tensor_in.name}`: {tensor_in.data_type}, {tensor_in.dims} (batch axis first)
- preprocessing: scale so the shorter side is {spec.get('resize', '?')} (and the crop fits), {interpolation}
  interpolation, center-crop to {size[0]}x{size[1]}, scale to [0, 1], subtract mean {spec.get('mean', '?')},
  divide by std {spec.get('std', '?')}, {spec.get('channels', '?')} channel(s), channels first
- max_batch_size: {max_batch}{_rewrite_note(rewritten)}
{_plan_notes(served, max_batch)}
```python
import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

def preprocess(path):
    image = Image.open(path).convert("{'L' if spec.get('channels') == 1 else 'RGB'}")
    scale = max({spec.get('resize', size[0])} / min(image.size), {size[0]} / image.height, {size[1]} / image.width)
    width, height = max({size[1]}, round(image.width * scale)), max({size[0]}, round(image.height * scale))
    image = image.resize((width, height), Image.{interpolation.upper()})
    left, top = (width - {size[1]}) // 2, (height - {size[0]}) // 2
    array = np.asarray(image.crop((left, top, left + {size[1]}, top + {size[0]})), np.float32) / 255
    array = array.reshape(array.shape[0], array.shape[1], -1)
    array = (array - np.array({spec.get('mean', [0.0])}, np.float32)) / np.array({spec.get('std', [1.0])}, np.float32)
    return array.transpose(2, 0, 1)

with grpcclient.InferenceServerClient("localhost:8001") as client:
    batch = {batching}
    inputs = [grpcclient.InferInput("{tensor_in.name}", list(batch.shape), "FP32")]
    inputs[0].set_data_from_numpy(batch)
{classification}    result = client.infer("{name}", inputs, outputs=outputs)
{printing}```
"""
