"""ONNX models as data: loading, the toolkit's metadata, and graph queries (no torch).

Export, precision, sensitivity, engines and ``inspect`` all read models through these functions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxError, first_line
from .preprocessing import Preprocessing

META_PREFIX = "resnet_export."


def set_metadata(model: onnx.ModelProto, values: dict) -> None:
    """Store ``values`` (JSON-serialisable) in ``metadata_props`` under the toolkit's prefix."""
    from ._version import __version__

    values = {"version": __version__, **values}
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        prop = existing.get(META_PREFIX + key) or model.metadata_props.add()
        prop.key, prop.value = META_PREFIX + key, json.dumps(value)
    model.producer_name = "resnet-export"
    model.producer_version = __version__


def read_metadata(path_or_model) -> dict:
    """The toolkit's ``metadata_props`` of an ONNX file or model, decoded (empty for foreign files)."""
    model = load_onnx(path_or_model, load_weights=False) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    return {
        p.key[len(META_PREFIX):]: json.loads(p.value) for p in model.metadata_props if p.key.startswith(META_PREFIX)
    }


def load_onnx(path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, or raise one line saying why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"ONNX file {path} not found")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf DecodeError and friends
        raise OnnxError(f"{path} is not an ONNX model ({first_line(exc)})") from exc


def onnx_opset(path_or_model) -> int:
    """The default-domain opset an ONNX file or model declares."""
    model = load_onnx(path_or_model, load_weights=False) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def graph_inputs(model: onnx.ModelProto) -> list:
    """The model's real inputs (old exporters also list initializers as graph inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def input_dims(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """Name and dims (None where dynamic) of the model's first input."""
    first = graph_inputs(model)[0]
    return first.name, [d.dim_value or None for d in first.type.tensor_type.shape.dim]


def op_counts(model: onnx.ModelProto) -> Counter:
    """How many nodes of each op type the main graph has."""
    return Counter(node.op_type for node in model.graph.node)


def quantized_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv nodes whose activation input comes from a DequantizeLinear."""
    producers = {out: node for node in model.graph.node for out in node.output}
    return [
        node for node in model.graph.node
        if node.op_type == "Conv" and getattr(producers.get(node.input[0]), "op_type", None) == "DequantizeLinear"
    ]


def qdq_summary(path_or_model) -> dict:
    """Counts that show a model's precision: Q/DQ pairs, quantized convs, FP16 initializers, BatchNorms."""
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else load_onnx(path_or_model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    quantized = quantized_convs(model)
    return {
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
        "convs": len(convs),
        "quantized_convs": len(quantized),
        "fp16_initializers": sum(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer),
        "batchnorms": sum(n.op_type == "BatchNormalization" for n in model.graph.node),
    }


def input_spec(model: onnx.ModelProto) -> Preprocessing:
    """Input shape of a (possibly foreign) ONNX model: its metadata, else its static dims, else 224."""
    stored = read_metadata(model).get("preprocessing")
    if stored:
        return Preprocessing.from_dict(stored)
    name, dims = input_dims(model)
    if len(dims) != 4:
        raise OnnxError(f"input '{name}' has {len(dims)} dims; expected (N, C, H, W)")
    channels, height, width = dims[1] or 3, dims[2] or 224, dims[3] or 224
    return Preprocessing((height, width), max(height, width), (0.0,) * channels, (1.0,) * channels, channels)


def onnx_preprocessing(path: str | Path) -> Preprocessing:
    """The preprocessing stored at export, or one derived from the input shape of a foreign ONNX."""
    return input_spec(load_onnx(path, load_weights=False))


def graph_precision(path_or_model) -> dict:
    """An ONNX's precision record: the one this toolkit stored in its metadata, else what its graph shows.

    A foreign model gets ``{"dtype": ..., "from": ...}``: int8 where it has Q/DQ nodes, fp16 where it
    has float16 weights, else fp32; so a Q/DQ model made elsewhere gets the INT8 gate and is served and
    described as INT8, never as FP32.
    """
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else load_onnx(path_or_model, load_weights=False)
    stored = read_metadata(model).get("precision")
    if stored:
        return stored
    counts = qdq_summary(model)
    if counts["quantize_linear"] or counts["dequantize_linear"]:
        return {"dtype": "int8", "from": "its graph (Q/DQ nodes)"}
    if counts["fp16_initializers"]:
        return {"dtype": "fp16", "from": "its graph (float16 weights)"}
    return {"dtype": "fp32", "from": "its graph (no Q/DQ, no float16 weights)"}


def conv_weight_peak(model: onnx.ModelProto) -> int | None:
    """The largest magnitude among the int8 weights of ``model``'s quantized convs, read from the initializers
    (64 for ONNX Runtime's 7-bit ``reduce_range`` form, whose symmetric range is [-64, 64]); None where no conv
    weight is int8."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    peak = None
    for conv in (node for node in model.graph.node if node.op_type == "Conv"):
        dq = producers.get(conv.input[1])
        name = dq.input[0] if dq is not None and dq.op_type == "DequantizeLinear" else conv.input[1]
        if name in initializers and initializers[name].data_type == onnx.TensorProto.INT8:
            peak = max(peak or 0, int(np.abs(numpy_helper.to_array(initializers[name]).astype(np.int16)).max()))
    return peak
