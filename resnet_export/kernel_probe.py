"""What this CPU's fused u8s8 INT8 kernels do, measured with two tiny Q/DQ convolutions, not read from its flags.

ONNX Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into integer kernels. Each construction here
makes that fused run part from the exact run of the same graph (graph optimizations off) where one kind of kernel
loses precision, and nowhere else:

- pair saturation: CPUs without VNNI (AVX2, AVX-512 before Cascade Lake, Zen 2/3) add each pair of u8*s8 products
  in a 16-bit register (``vpmaddubsw``) that saturates; the sum of 4000 channels flips sign there;
- int32 overflow: where products add in 32 bits (VNNI, AMX), 8192 x 3 x 3 terms of 255 * 127 wrap the accumulator.

An emulator may show the host's flags (QEMU user mode passes the host's /proc/cpuinfo through) while running its
own kernels, so what the toolkit records and reasons from is what these runs measure. Torch-free, so that a probe
under emulation stays quick.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def qdq_conv(weights: np.ndarray, y_scale: float) -> onnx.ModelProto:
    """A two-class Q/DQ conv: uint8 input (scale 1/255), int8 ``weights`` (scale 0.01), uint8 output (zero point 128)."""
    channels, kernel = weights.shape[1], weights.shape[2]
    inits = [numpy_helper.from_array(weights, "w_q"), numpy_helper.from_array(np.full(2, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(2, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "x_s"),
             numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
             numpy_helper.from_array(np.array(y_scale, np.float32), "y_s"),
             numpy_helper.from_array(np.array(128, np.uint8), "y_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "x_s", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "y_s", "y_zp"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_zp"], ["yd"]),
             helper.make_node("Flatten", ["yd"], ["logits"])]
    graph = helper.make_graph(nodes, "fused_differs", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                       ["N", channels, kernel, kernel])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    # IR version stated: onnx 1.23's make_model writes IR 14 by default, which ONNX Runtime 1.31 refuses (max 13)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=10)


def overflow_case(channels: int = 8192, kernel: int = 3) -> tuple[onnx.ModelProto, np.ndarray]:
    """The conv whose int32 accumulator wraps where u8*s8 products add in 32 bits (VNNI, AMX), and inputs whose first
    sample makes it wrap: 255 times +-127 over 8192 x 3 x 3 terms is 2.4e9 > 2**31."""
    weights = np.full((2, channels, kernel, kernel), 127, np.int8)
    weights[1] = -127
    inputs = np.random.default_rng(0).uniform(0.5, 1.0, (4, channels, kernel, kernel)).astype(np.float32)
    inputs[0] = 1.0
    return qdq_conv(weights, 2000.0), inputs


def saturation_case(groups: int = 1000) -> tuple[onnx.ModelProto, np.ndarray]:
    """The 1x1 conv whose class 0 flips sign where pairs of u8*s8 products add in 16 bits with saturation (AVX2 and
    AVX-512 without VNNI), and inputs at 255.

    Class 0 repeats (127, 127, -127, -126) over 4000 channels: exactly each group sums to +255, but its pairs
    saturate to 32767 and -32768, so fused each group is -1. Its 32-bit sum never overflows: exact on VNNI.
    """
    weights = np.zeros((2, 4 * groups, 1, 1), np.int8)
    weights[0, :, 0, 0] = np.tile(np.array([127, 127, -127, -126], np.int8), groups)
    return qdq_conv(weights, 0.01), np.ones((4, 4 * groups, 1, 1), np.float32)


def fused_and_exact(model: onnx.ModelProto, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs on ONNX Runtime's CPU provider, fused (all optimizations) and exact (none)."""
    import onnxruntime as ort

    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"input": inputs})[0])
    return outputs[0], outputs[1]


def differs(model: onnx.ModelProto, inputs: np.ndarray) -> bool:
    """Whether the fused run flips a sign of the first sample's logits against the exact run."""
    fused, exact = fused_and_exact(model, inputs[:1])
    return bool((np.sign(fused[0]) != np.sign(exact[0])).any())


@functools.cache
def probe() -> dict:
    """What this CPU's fused u8s8 kernels were measured to do: ``pair_saturation`` (16-bit pair sums saturate, so
    8-bit weights are not exact here) and ``int32_overflow`` (products add in 32 bits), once per process."""
    return {"pair_saturation": differs(*saturation_case()), "int32_overflow": differs(*overflow_case())}


if __name__ == "__main__":  # what an emulated CPU's kernels do: python -m resnet_export.kernel_probe
    import json

    print(json.dumps(probe()))
