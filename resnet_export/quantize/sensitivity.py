"""Which quantized convolutions hurt accuracy most: per-layer output error of INT8 against FP32.

Each quantized Conv's output is compared between the FP32 and the INT8 model on the same inputs;
a layer's sensitivity is the relative error it adds, its output error minus the error already present
at its input, so layers are not blamed for what came before them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..onnx_graph import quantized_convs
from .precision import PrecisionError
from ..runtime.runners import OrtRunner


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> tuple[bytes, list[str]]:
    """Serialized copy of ``model`` exposing ``names`` as extra outputs (those whose type is known)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    typed = {info.name: info for info in inferred.graph.value_info}
    typed.update({info.name: info for info in inferred.graph.output})
    present = [name for name in names if name in typed]
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    del extended.graph.output[:]
    extended.graph.output.extend(typed[name] for name in present)
    return extended.SerializeToString(), present


def _tensor_values(model: onnx.ModelProto, names: list[str], inputs: np.ndarray) -> dict[str, np.ndarray]:
    serialized, present = _with_outputs(model, names)
    runner = OrtRunner(serialized)
    values = runner.session.run(present, {runner.input_name: inputs})
    return {name: value.astype(np.float32) for name, value in zip(present, values)}


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.linalg.norm(candidate - reference) / max(np.linalg.norm(reference), 1e-12))


def _quantized_view(model: onnx.ModelProto, tensor: str) -> str:
    """The tensor as the next layer sees it: the DequantizeLinear output of ``Q(tensor)``, if any.

    ONNX Runtime's QDQ quantizer drops a ReLU after a Conv (the uint8 quantization clips instead),
    so the raw tensor of that name is unclipped; its dequantized view is what the FP32 tensor means.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for q in consumers.get(tensor, []):
        if q.op_type == "QuantizeLinear":
            for dq in consumers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    return dq.output[0]
    return tensor


def rank_quantized_convs(fp32_path: str | Path, int8_path: str | Path, inputs: np.ndarray) -> list[tuple[str, float]]:
    """Quantized Conv node names of ``int8_path``, most sensitive first, with their added error."""
    fp32 = onnx.load(str(fp32_path))
    int8 = onnx.load(str(int8_path))
    fp32_tensors = {out for node in fp32.graph.node for out in node.output}
    fp32_convs = {node.name: node for node in fp32.graph.node if node.op_type == "Conv"}
    # (node name, output tensor, input tensor): FP32 names; the output may be a fused Conv+Relu's.
    triples = []
    for node in quantized_convs(int8):
        if node.name not in fp32_convs or node.output[0] not in fp32_tensors:
            raise PrecisionError(f"sensitivity: quantized conv '{node.name}' of {int8_path} has no counterpart "
                                 f"(same name and output tensor) in {fp32_path}")
        triples.append((node.name, node.output[0], fp32_convs[node.name].input[0]))
    names = sorted({t for _, out, inp in triples for t in (out, inp) if t in fp32_tensors})
    views = {name: _quantized_view(int8, name) for name in names}
    reference = _tensor_values(fp32, names, inputs)
    candidate = _tensor_values(int8, sorted(set(views.values())), inputs)

    graph_inputs = {i.name for i in fp32.graph.input}

    def error(tensor: str) -> float:
        if tensor in graph_inputs:  # the model's own input: no error yet
            return 0.0
        a, b = reference.get(tensor), candidate.get(views.get(tensor, ""))
        if a is None or b is None or a.shape != b.shape:
            raise PrecisionError(f"sensitivity: tensor '{tensor}' cannot be compared between {fp32_path} and "
                                 f"{int8_path} ({'missing' if a is None or b is None else 'shapes differ'})")
        return _relative_error(a, b)

    scores = [(name, error(out) - error(inp)) for name, out, inp in triples]
    return sorted(scores, key=lambda item: item[1], reverse=True)
