"""Graph rewrites that make ONNX Runtime's CPU provider compute what an ONNX graph says.

ONNX Runtime's CPU ``QuantizeLinear`` truncates toward zero when its input is float16 instead of
rounding half to even as the ONNX spec requires (microsoft/onnxruntime#18576 and #22741; fixed
upstream by PR #32452, after the 1.24 series this toolkit installs). A TensorRT-target INT8 model
with its non-quantized part in FP16 quantizes float16 tensors everywhere, so on the CPU every
activation lands half a step low on average and a trained ResNet appears to lose accuracy that
TensorRT, which rounds correctly, never loses.

The rewrite only changes how the CPU evaluates those nodes, never the artifact: each float16
``QuantizeLinear`` gets its input cast to float32 (exact) and a float32 copy of its scale (exact), so
``round(x / scale)`` is computed as the spec says.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _is_fp16_quantize(node: onnx.NodeProto, fp16_scales: set[str]) -> bool:
    return node.op_type == "QuantizeLinear" and node.input[1] in fp16_scales


def fp16_quantize_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``QuantizeLinear`` nodes whose scale is a float16 initializer (so their input is float16)."""
    fp16_scales = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    return [n for n in model.graph.node if _is_fp16_quantize(n, fp16_scales)]


def quantize_in_fp32(model: onnx.ModelProto) -> int:
    """Rewrite every float16 ``QuantizeLinear`` of ``model`` (in place) to compute in float32.

    Returns how many nodes were rewritten; the outputs (int8) and all other nodes are unchanged.
    """
    inits = {i.name: i for i in model.graph.initializer}
    fp16_scales = {name for name, init in inits.items() if init.data_type == TensorProto.FLOAT16}
    fp32_scales: dict[str, str] = {}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        if _is_fp16_quantize(node, fp16_scales):
            scale = node.input[1]
            if scale not in fp32_scales:
                fp32_scales[scale] = f"{scale}__fp32"
                array = numpy_helper.to_array(inits[scale]).astype(np.float32)
                model.graph.initializer.append(numpy_helper.from_array(array, fp32_scales[scale]))
            label = node.name or node.output[0]
            cast = helper.make_node("Cast", [node.input[0]], [f"{label}__input_fp32"], name=f"{label}__cast_fp32",
                                    to=TensorProto.FLOAT)
            nodes.append(cast)
            node.input[0], node.input[1] = cast.output[0], fp32_scales[scale]
            rewritten += 1
        nodes.append(node)
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten
