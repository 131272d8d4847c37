"""FP16 and INT8 ONNX of a really trained model (digits), verified on its held-out split."""

import json

import numpy as np
import onnx
import pytest
import torch

from resnet_export.errors import GateFailed
from resnet_export.source.models import load_model
from resnet_export.onnx_graph import qdq_summary
from resnet_export.pipeline import PrecisionRequest, onnx_from_model, precision_from_onnx
from resnet_export.quantize.precision import PrecisionError, check_method
from resnet_export.runtime.runners import TorchRunner

from ..digits import RESNET18

CALIB = 256


def _accuracy_drop(result):
    metrics = result.verification.metrics
    return 100 * (metrics["accuracy_reference"] - metrics["accuracy_candidate"])


@pytest.fixture(scope="module")
def fp16(digits):
    return precision_from_onnx(digits.fp32, digits.root / "fp16.onnx", PrecisionRequest("fp16", val=digits.val),
                               reference=TorchRunner(digits.model.module))


@pytest.fixture(scope="module")
def int8_trt(digits):
    return precision_from_onnx(digits.fp32, digits.root / "int8_trt.onnx",
                               PrecisionRequest("int8", digits.train, "trt", calib_size=CALIB, val=digits.val),
                               reference=TorchRunner(digits.model.module))


@pytest.fixture(scope="module")
def int8_cpu(digits_cpu_int8):
    return digits_cpu_int8


@pytest.mark.slow
def test_the_reference_model_is_really_trained(digits, fp16):
    assert fp16.verification.metrics["accuracy_reference"] >= 0.95
    assert fp16.verification.metrics["samples"] == 449


@pytest.mark.slow
def test_fp16_keeps_accuracy(fp16):
    assert fp16.verification.passed
    assert _accuracy_drop(fp16) <= 0.2
    model = onnx.load(str(fp16.path))
    assert qdq_summary(model)["fp16_initializers"] > 0
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 I/O kept
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.slow
def test_int8_trt_target_keeps_accuracy_with_trt_placement(int8_trt):
    assert int8_trt.verification.passed and _accuracy_drop(int8_trt) <= 1.0
    model = onnx.load(str(int8_trt.path))
    summary = qdq_summary(model)
    assert summary["quantized_convs"] == summary["convs"] == 9
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    # TensorRT fuses a residual Add into the conv when the identity branch arrives through Q/DQ.
    assert adds and all(any(producers.get(i) == "DequantizeLinear" for i in add.input) for add in adds)
    zero_points = {i.name: i for i in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(zero_points[n.input[2]].data_type == onnx.TensorProto.INT8 for n in q_nodes if len(n.input) > 2)
    manifest = json.loads(int8_trt.path.with_name("int8_trt.onnx.json").read_text())
    assert manifest["conversion"]["calibration_samples"] == CALIB and manifest["verification"]["passed"]


@pytest.mark.slow
def test_int8_cpu_target_is_u8_activations_s8_per_channel_weights(int8_cpu):
    assert int8_cpu.verification.passed and _accuracy_drop(int8_cpu) <= 1.0
    model = onnx.load(str(int8_cpu.path))
    inits = {i.name: i for i in model.graph.initializer}
    activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_q and all(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in activation_q)
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert weight_dq and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weight_dq)
    assert all(len(onnx.numpy_helper.to_array(inits[n.input[1]]).shape) == 1 for n in weight_dq)  # per channel


@pytest.mark.slow
def test_percentile_for_trt_keeps_the_placement_with_other_ranges(digits, int8_trt):
    result = precision_from_onnx(digits.fp32, digits.root / "int8_pct.onnx",
                                 PrecisionRequest("int8", digits.train, "trt", "percentile", calib_size=CALIB, val=digits.val))
    assert result.verification.passed and result.record.calibration_method == "percentile"

    def quantized(path):
        model = onnx.load(str(path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        return {n.input[0]: float(np.max(inits[n.input[1]])) for n in model.graph.node if n.op_type == "QuantizeLinear"
                and n.input[1] in inits and inits[n.input[1]].size == 1}

    entropy, percentile = quantized(int8_trt.path), quantized(result.path)
    assert set(entropy) == set(percentile)  # same tensors quantized: ModelOpt's placement
    assert any(abs(entropy[k] - percentile[k]) > 1e-6 for k in entropy)  # different calibration


@pytest.fixture(scope="module")
def outlier_channel(digits_r18, tmp_path_factory):
    """The trained ResNet-18 with one activation channel 1000x the others, the same function in FP32.

    Inside layer3.0, channel 0 of the first BatchNorm is scaled by 1000 and the next conv's weights
    on that channel by 1/1000: the per-tensor INT8 range of that conv's input is spent on one channel.
    """
    root = tmp_path_factory.mktemp("outlier")
    state = torch.load(digits_r18.checkpoint, weights_only=True)
    state["layer3.0.bn1.weight"][0] *= 1000
    state["layer3.0.bn1.bias"][0] *= 1000
    state["layer3.0.conv2.weight"][:, 0] /= 1000
    torch.save(state, root / "outlier.pth")
    model = load_model(**RESNET18, weights=str(root / "outlier.pth"))
    return model, onnx_from_model(model, root / "fp32.onnx", images=digits_r18.val).path


@pytest.mark.slow
def test_sensitivity_search_keeps_layers_in_higher_precision(digits_r18, outlier_channel):
    """The conv fed by the outlier channel ranks first and keeping it out of INT8 meets the gate."""
    model, fp32 = outlier_channel
    request = PrecisionRequest("int8", digits_r18.train, "trt", calib_size=CALIB, val=digits_r18.val,
                               min_agreement=0.97, rest="fp32")
    result = precision_from_onnx(fp32, fp32.with_name("int8_strict.onnx"), request, reference=TorchRunner(model.module))
    assert result.before["top1_agreement"] < 0.97
    assert result.verification.passed and result.verification.metrics["top1_agreement"] >= 0.97
    graph = onnx.load(str(fp32)).graph
    outlier_conv = next(n.name for n in graph.node if n.op_type == "Conv" and n.input[1] == "layer3.0.conv2.weight")
    assert result.excluded[0][0] == outlier_conv  # the most sensitive conv is the one the outlier feeds
    artifact = onnx.load(str(result.path)).graph  # the convs whose weights stayed float, read from the file
    dequantized = {n.output[0] for n in artifact.node if n.op_type == "DequantizeLinear"}
    float_weights = {n.name for n in artifact.node if n.op_type == "Conv" and n.input[1] not in dequantized}
    assert float_weights == {name for name, _ in result.excluded} == set(result.record.excluded_nodes)
    first, *search = result.attempts
    assert first.excluded == [] and not first.passed and first.metrics["top1_agreement"] < 0.97
    assert search and all(a.rest == "fp32" and a.excluded for a in search)
    assert result.record.ranges_reused  # the search quantized with the first calibration's ranges
    summary = qdq_summary(result.path)
    assert summary["quantized_convs"] == summary["convs"] - len(result.excluded)
    manifest = json.loads(result.path.with_name("int8_strict.onnx.json").read_text())
    assert manifest["sensitivity"]["excluded"] and manifest["sensitivity"]["metrics_before"]


@pytest.mark.slow
def test_missed_gate_keeps_artifact(digits, tmp_path):
    """Calibrating on constant inputs gives useless ranges: the gate must catch it."""
    constant = tmp_path / "constant.npy"
    np.save(constant, np.full((64, 1, 32, 32), -2.0, dtype=np.float32))
    out = tmp_path / "bad.onnx"
    with pytest.raises(GateFailed, match="failed the INT8 gate: top-1 agreement"):
        precision_from_onnx(digits.fp32, out, PrecisionRequest("int8", constant, "cpu", val=digits.val))
    assert out.is_file()
    assert json.loads((tmp_path / "bad.onnx.json").read_text())["verification"]["passed"] is False


def test_method_names_depend_on_target():
    assert check_method("trt", None) == "entropy" and check_method("cpu", None) == "minmax"
    with pytest.raises(PrecisionError, match="not available for `target` trt"):
        check_method("trt", "minmax")


@pytest.mark.slow
def test_trt_target_served_by_plain_onnx_runtime_computes_what_tensorrt_computes(digits, int8_trt, tmp_path):
    """Triton's onnxruntime backend is a plain ONNX Runtime session: the repository's model must round its
    float16 QuantizeLinear as the spec and TensorRT do, not truncate them as ONNX Runtime's CPU kernel does."""
    import onnxruntime as ort

    from resnet_export.data import image_inputs
    from resnet_export.runtime.ort_fixes import fp16_quantize_nodes
    from resnet_export.runtime.runners import OrtRunner
    from resnet_export.deploy.triton import TritonRequest, triton_entry

    assert int8_trt.record.rest == "fp16" and fp16_quantize_nodes(onnx.load(str(int8_trt.path)))
    entry = triton_entry(int8_trt.path, tmp_path / "repo", TritonRequest(kind="cpu"))
    served = entry.model_dir / "1" / "model.onnx"
    assert not fp16_quantize_nodes(onnx.load(str(served)))
    assert "computed in float32" in (entry.model_dir / "README.md").read_text()
    x = image_inputs(digits.val, digits.model.preprocessing, limit=64).array

    def plain(path):  # what Triton's backend runs: no rewrite of the toolkit's
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    as_tensorrt = OrtRunner(int8_trt.path).infer(x)  # spec rounding (ort_fixes)
    np.testing.assert_allclose(plain(served), as_tensorrt, rtol=0, atol=1e-5)
    assert np.abs(plain(int8_trt.path) - as_tensorrt).max() > 1e-2  # the raw artifact would compute another model


def test_sensitivity_refuses_a_tensor_it_cannot_compare(tmp_path):
    """A quantized conv whose output cannot be compared with the FP32 one (here its shape differs) is an error,
    never an error of 0."""
    from onnx import TensorProto, helper, numpy_helper

    from resnet_export.quantize.sensitivity import rank_quantized_convs

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    scale, zero = numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")

    def model(path, quantized: bool):
        first = "input"
        nodes = []
        if quantized:
            nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
                     helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
            first = "dq"
        nodes += [helper.make_node("Conv", [first, "w"], ["c"], name="conv", pads=[1, 1, 1, 1],
                                   strides=[2, 2] if quantized else [1, 1]),
                  helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])]
        graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 8, 8])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 4])],
                                  [weight, scale, zero] if quantized else [weight])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=10), path)
        return path

    fp32, int8 = model(tmp_path / "fp32.onnx", False), model(tmp_path / "int8.onnx", True)
    inputs = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.raises(PrecisionError, match="tensor 'c' cannot be compared .* \\(shapes differ\\)"):
        rank_quantized_convs(fp32, int8, inputs)


def test_reused_ranges_are_checked_in_the_artifact(tmp_path):
    """ranges_reused is what the quantized model's scales show: equal to the saved ranges, or an error."""
    from resnet_export.quantize.precision import _check_ranges_applied

    saved, written = tmp_path / "saved.cache", tmp_path / "written.cache"
    saved.write_text("TRT-100000-EntropyCalibration2\ninput: 3c23d70a\nrelu_1: 3d4ccccd\nrelu_2: 3e000000\n")
    written.write_text("TRT-100000-EntropyCalibration2\ninput: 3c23d70a\nrelu_2: 3e000000\n")  # a conv kept out
    assert _check_ranges_applied(saved, written, tmp_path / "m.onnx")
    written.write_text("TRT-100000-EntropyCalibration2\ninput: 3c23d70a\nrelu_2: 3e000001\n")  # calibrated anew
    with pytest.raises(PrecisionError, match="did not apply the saved activation ranges: 1 of 2 scales differ"):
        _check_ranges_applied(saved, written, tmp_path / "m.onnx")
    written.write_text("TRT-100000-EntropyCalibration2\n")
    with pytest.raises(PrecisionError, match="0 of 0 scales differ"):
        _check_ranges_applied(saved, written, tmp_path / "m.onnx")


def report_ort_patched(patch_first: bool, messages) -> None:
    """Child-process body: patch ONNX Runtime's calibrators as ModelOpt does when it quantizes (if asked), then
    report through the error channel whether they are ModelOpt's."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    if patch_first:
        from modelopt.onnx.quantization.ort_patching import patch_ort_modules

        patch_ort_modules(calibrate_per_node=True)
    patched = MinMaxCalibrater.augment_graph.__module__.startswith("modelopt")
    messages.put(("error", "patched") if patched else ("done", None))


def test_each_quantization_starts_from_an_unpatched_onnx_runtime():
    """ModelOpt patches ONNX Runtime's quantization modules process-wide when it quantizes: a job after one that
    patched them still gets ONNX Runtime's own (each job is a fresh child of the preloaded server, or spawned)."""
    from resnet_export.quantize.precision import _run_isolated

    with pytest.raises(PrecisionError, match="patched"):
        _run_isolated(report_ort_patched, (True,), "patching", 1, "job")  # the patch took, in that child
    _run_isolated(report_ort_patched, (False,), "after", 1, "job")  # the next child is clean
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    assert not MinMaxCalibrater.augment_graph.__module__.startswith("modelopt")  # nor is this process touched
