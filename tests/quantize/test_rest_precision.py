"""TensorRT-target INT8: the precision of the non-quantized rest, chosen by verification.

The trained ResNet-18 of tests/digits.py is the model that showed the problem: its FP16-rest INT8
looked 1.56 points worse than FP32 on ONNX Runtime's CPU, because that provider truncates float16
QuantizeLinear instead of rounding (ort_fixes). With the nodes evaluated as the spec says, every
calibration method meets the INT8 gate with the FP16 rest.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from resnet_export.errors import GateFailed
from resnet_export.pipeline import PrecisionRequest, precision_from_onnx
from resnet_export.quantize.precision import PrecisionError
from resnet_export.runtime.runners import OrtRunner

from ..test_cli import assert_one_line_error, run

CALIB = "256"


def _fp16_quantize_model(scale: float) -> bytes:
    """float32 in -> Cast to float16 -> QuantizeLinear -> DequantizeLinear (float16 scale) -> float32 out."""
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("QuantizeLinear", ["x16", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y16"]),
        helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array(scale, np.float16), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10).SerializeToString()


def test_cpu_runner_rounds_fp16_quantize_half_to_even():
    x = np.array([[2.7, -2.7, 3.5, 2.5, 0.9, -0.9, 0.05, 200.0]], np.float32)
    runner = OrtRunner(_fp16_quantize_model(1.0))
    assert runner.fp16_quantize_rewritten == 1
    x16 = x.astype(np.float16).astype(np.float32)
    expected = np.clip(np.rint(x16), -128, 127)  # ONNX: saturate(round_half_to_even(x / scale))
    np.testing.assert_array_equal(runner.infer(x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["entropy", "percentile"])  # max: ModelOpt's other own calibrator, as entropy
def test_every_trt_method_meets_the_gate_by_default(digits_r18, tmp_path, method):
    out = tmp_path / f"r18-{method}.onnx"
    result = run("quantize", digits_r18.fp32, "--int8", "--calib", digits_r18.train, "--calib-size", CALIB,
                 "--val", digits_r18.val, "--calib-method", method, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"INT8 (trt, {method}, 256 calibration samples, rest FP16)" in result.stdout
    manifest = json.loads(out.with_name(out.name + ".json").read_text())
    metrics = manifest["verification"]["metrics"]
    assert metrics["samples"] == 449 and metrics["top1_agreement"] >= 0.97 and metrics["accuracy_drop_points"] <= 1.0
    assert manifest["rest"]["requested"] == "auto" and manifest["rest"]["chosen"] == "fp16"
    (attempt,) = manifest["rest"]["attempts"]
    assert attempt["rest"] == "fp16" and attempt["passed"]
    from resnet_export.data import image_inputs
    from resnet_export.onnx_graph import onnx_preprocessing
    from resnet_export.checks.verify import compare

    val = image_inputs(digits_r18.val, onnx_preprocessing(out)).array  # the recorded metrics, observed again here
    again = compare(OrtRunner(digits_r18.fp32).infer(val), OrtRunner(out).infer(val))
    assert again["top1_agreement"] == metrics["top1_agreement"] == attempt["metrics"]["top1_agreement"]
    assert again["min_cosine"] == pytest.approx(metrics["min_cosine"], abs=1e-6)
    assert "onnxruntime#18576" in manifest["conversion"]["cpu_verification_note"]
    model = onnx.load(str(out))  # the artifact is ModelOpt's FP16-rest graph, not the CPU rewrite
    assert not any(node.name.endswith("__cast_fp32") for node in model.graph.node)
    assert sum(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer) > 0


@pytest.mark.slow
def test_rest_fp32_on_request_and_inspect_shows_it(digits_r18, tmp_path):
    out = tmp_path / "r18-fp32-rest.onnx"
    result = run("quantize", digits_r18.fp32, "--int8", "--calib", digits_r18.train, "--calib-size", CALIB,
                 "--val", digits_r18.val, "--rest", "fp32", "-o", out)
    assert result.exit_code == 0, result.output
    assert "rest FP32" in result.stdout
    model = onnx.load(str(out))
    assert not any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    shown = json.loads(run("inspect", out, "--json").stdout)
    assert shown["precision"]["rest"] == "fp32" and shown["manifest"]["rest"]["chosen"] == "fp32"


@pytest.mark.slow
def test_auto_tries_the_fp32_rest_with_the_same_ranges_when_fp16_misses(digits_r18, tmp_path):
    """Max-calibrated on blank inputs, both rests miss the gate: both are recorded, the FP32 one reused the ranges."""
    blank = tmp_path / "blank.npy"
    np.save(blank, np.zeros((64, 1, 32, 32), dtype=np.float32))
    out = tmp_path / "bad.onnx"
    with pytest.raises(GateFailed, match="failed the INT8 gate"):
        precision_from_onnx(digits_r18.fp32, out, PrecisionRequest("int8", blank, "trt", "max", val=digits_r18.val))
    manifest = json.loads(out.with_name("bad.onnx.json").read_text())
    first, second = manifest["rest"]["attempts"]
    assert first["rest"] == "fp16" and second["rest"] == "fp32"
    assert not first["passed"] and not second["passed"]
    assert not first["ranges_reused"] and second["ranges_reused"]  # the FP32 rest reused the FP16 attempt's ranges
    kept = max((first, second), key=lambda a: (a["metrics"]["top1_agreement"], a["metrics"]["min_cosine"]))
    assert manifest["rest"]["chosen"] == kept["rest"] and manifest["verification"]["metrics"] == kept["metrics"]


def test_rest_only_for_int8_trt(resnet18_onnx, tmp_path):
    with pytest.raises(PrecisionError, match="INT8 for the trt target only"):
        PrecisionRequest("fp16", rest="fp16")
    result = run("quantize", resnet18_onnx.path, "--fp16", "--rest", "fp32", "-o", tmp_path / "h.onnx")
    assert_one_line_error(result, "rest precision is a setting of INT8 for the trt target only")


@pytest.mark.slow
def test_fp16_autocast_keeps_agreement_and_casts_every_compute_node(digits_r18, tmp_path):
    """AutoCast on the trained ResNet-18: FP16 everywhere but the FP32 input and output casts."""
    result = precision_from_onnx(digits_r18.fp32, tmp_path / "fp16.onnx", PrecisionRequest("fp16", val=digits_r18.val))
    assert result.verification.passed and result.verification.metrics["top1_agreement"] >= 0.99
    model = onnx.shape_inference.infer_shapes(onnx.load(str(result.path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    fp32_nodes = [n.op_type for n in model.graph.node if types.get(n.output[0]) == TensorProto.FLOAT]
    assert fp32_nodes == ["Cast"]  # the output cast back to FP32; nothing else kept in FP32
    assert all(types.get(n.output[0]) == TensorProto.FLOAT16 for n in model.graph.node if n.op_type == "Conv")
