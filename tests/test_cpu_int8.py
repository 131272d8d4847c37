"""INT8 that holds on the CPU that runs it: weight forms, the fused-vs-exact check, the fidelity gate,
calibration samples kept out of verification, and the CPU recorded in the manifest."""

import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from resnet_export.cpu import INT8_FLAGS, cpu_info, describe_cpu, exact_u8s8, saturation_risk
from resnet_export.data import Inputs, calibration_data, image_inputs, split_counts
from resnet_export.errors import EXIT_GATE_FAILED, GateFailed
from resnet_export.models import default_preprocessing
from resnet_export.pipeline import PrecisionRequest, precision_from_onnx
from resnet_export.precision import PrecisionError
from resnet_export.runners import OrtRunner, TorchRunner
from resnet_export.verify import GATES, KERNEL_GATE, verify

from .conftest import IMAGES
from .test_cli import run

CALIB = 256
AVX2_ONLY = {"model": "AMD EPYC 7B12", "arch": "x86_64", "flags": ["avx2"]}
VNNI = {"model": "Intel Xeon Platinum 8380", "arch": "x86_64", "flags": ["avx2", "avx512f", "avx512_vnni"]}


def weight_values(path) -> np.ndarray:
    """Every int8 weight of an ONNX Runtime QDQ model (the quantized initializers feeding Conv/Gemm DQs)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [numpy_helper.to_array(inits[n.input[0]]).ravel() for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == TensorProto.INT8]
    return np.concatenate(weights)


# --------------------------------------------------------------------------- machine facts, pure logic


def proc_cpuinfo_flags() -> list[str] | None:
    """The INT8 flags of /proc/cpuinfo's first ``flags`` line, read apart from cpu.py (None where there is none)."""
    import re
    from pathlib import Path

    path = Path("/proc/cpuinfo")
    found = re.search(r"^flags\s*:(.*)$", path.read_text(), re.MULTILINE) if path.is_file() else None
    return None if found is None else [f for f in INT8_FLAGS if re.search(rf"\b{f}\b", found[1])]


def test_cpu_info_reads_this_machine():
    import os

    info = cpu_info()
    assert info["arch"] == platform.machine() and info["cores"] == os.cpu_count()
    expected = proc_cpuinfo_flags()
    if expected is not None:  # Linux: the flags are what the kernel lists, in INT8_FLAGS order
        assert info["flags"] == expected
    assert describe_cpu(info).endswith(")")


def test_u8s8_exactness_follows_the_isa():
    assert not exact_u8s8(AVX2_ONLY) and "saturate" in saturation_risk(AVX2_ONLY)
    assert exact_u8s8(VNNI) and saturation_risk(VNNI) is None
    assert exact_u8s8({"arch": "x86_64", "flags": ["avx2", "avx_vnni"]})  # Alder Lake and later clients
    assert exact_u8s8({"arch": "aarch64", "flags": []})
    assert describe_cpu(AVX2_ONLY) == "AMD EPYC 7B12 (x86_64: avx2)"


def test_cpu_form_is_validated():
    with pytest.raises(PrecisionError, match="unknown CPU weight form 'avx'"):
        PrecisionRequest("int8", IMAGES, "cpu", cpu_form="avx")
    with pytest.raises(PrecisionError, match="for the cpu target only"):
        PrecisionRequest("int8", IMAGES, "trt", cpu_form="vnni")
    with pytest.raises(PrecisionError, match="set the INT8 gate; FP16 keeps its own"):
        PrecisionRequest("fp16", min_agreement=0.5)


# --------------------------------------------------------------------------- calibration never verifies


def test_split_always_holds_samples_out():
    assert split_counts(1000, 512, 500) == (512, 488)
    assert split_counts(600, 512, 500) == (480, 120)  # a fifth held out at least
    assert split_counts(6, 512, 500) == (4, 2)
    assert split_counts(2, 512, 500) == (1, 1)
    assert split_counts(6, 512, 0) == (6, 0)  # verification data given elsewhere: all may calibrate
    with pytest.raises(Exception, match="at least 2 are needed"):
        split_counts(1, 512, 500)


@pytest.mark.parametrize("kind", ["images", "npy"])
def test_calibration_and_verification_share_no_sample(tmp_path, kind):
    spec = default_preprocessing(3, (32, 32))
    source = IMAGES
    if kind == "npy":
        source = tmp_path / "arrays.npy"
        np.save(source, np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32))
    calibration, held_out = calibration_data(source, spec, 512, seed=0)
    assert len(calibration.array) and len(held_out.array)
    assert "only" in held_out.description and "pass `val`" in held_out.description  # too few: it says so
    for row in held_out.array:
        assert not any(np.array_equal(row, c) for c in calibration.array)


# --------------------------------------------------------------------------- fused vs exact


def qdq_conv_artifact(path, weights: np.ndarray, y_scale: float) -> None:
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
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def overflow_artifact(path, channels: int = 8192, kernel: int = 3) -> np.ndarray:
    """A conv whose int32 accumulator overflows in ONNX Runtime's fused kernel where u8*s8 products add in 32 bits
    (VNNI, AMX); returns inputs whose first sample overflows.

    uint8 input at 255 times int8 weights at +-127 over 8192 x 3 x 3 terms sums to 2.4e9 > 2**31: the
    fused QLinearConv wraps around while the exact run (Dequantize, float Conv, Quantize) does not.
    """
    weights = np.full((2, channels, kernel, kernel), 127, np.int8)
    weights[1] = -127
    qdq_conv_artifact(path, weights, 2000.0)
    array = np.random.default_rng(0).uniform(0.5, 1.0, (4, channels, kernel, kernel)).astype(np.float32)
    array[0] = 1.0  # the sample that overflows
    return array


def saturation_artifact(path, groups: int = 1000) -> np.ndarray:
    """A 1x1 conv whose sign flips in ONNX Runtime's fused kernel where adjacent u8*s8 products are added in 16
    bits with saturation first (AVX2 and AVX-512 without VNNI: vpmaddubsw); returns inputs at 255.

    Class 0 repeats the weights (127, 127, -127, -126) over 4000 channels: exactly each group sums to
    255 * 126 - 255 * 126 + 255 = +255, but the pairs saturate to 32767 and -32768, so fused each group is -1.
    Its sum in 32 bits never overflows, so on VNNI the fused run is exact (``overflow_artifact`` is that case).
    """
    weights = np.zeros((2, 4 * groups, 1, 1), np.int8)
    weights[0, :, 0, 0] = np.tile(np.array([127, 127, -127, -126], np.int8), groups)
    qdq_conv_artifact(path, weights, 0.01)
    return np.ones((4, 4 * groups, 1, 1), np.float32)


def fused_differs_artifact(folder) -> tuple:
    """Where this CPU's fused u8s8 kernel and the exact run part, found by running both constructions (int32
    overflow where products add in 32 bits: VNNI, AMX; 16-bit pair saturation where they do not: AVX2, AVX-512
    without VNNI), not by reading the CPU's flags (which an emulator may not show): (path, inputs)."""
    for make in (overflow_artifact, saturation_artifact):
        path = folder / f"{make.__name__}.onnx"
        inputs = make(path)
        fused, exact = OrtRunner(path).infer(inputs), OrtRunner(path, exact=True).infer(inputs)
        if (np.sign(fused[0]) != np.sign(exact[0])).any():
            return path, inputs
    raise AssertionError(f"neither construction makes the fused kernel differ on {describe_cpu(cpu_info())}")


def test_a_fused_run_that_differs_from_the_exact_run_fails_by_name(tmp_path):
    path, array = fused_differs_artifact(tmp_path)
    inputs = Inputs(array, None, "4 inputs")
    exact, fused = OrtRunner(path, exact=True), OrtRunner(path)
    healthy = verify(exact, exact, inputs, GATES["int8"], exact=OrtRunner(path, exact=True))
    assert healthy.passed and healthy.kernels["passed"]
    result = verify(exact, fused, inputs, GATES["int8"], exact=exact)
    assert not result.kernels["passed"] and result.kernels["metrics"]["min_cosine"] < 0
    assert any("differs from the exact run of the same graph on " + describe_cpu(cpu_info()) in f
               for f in result.failures)
    assert any("min cosine" in f for f in result.failures)  # the fidelity gate sees it against the reference too


def test_each_artifact_differs_where_its_kernel_runs(tmp_path):
    """Both constructions, computed exactly: the fused arithmetic each stands for flips the sign of class 0."""
    for make in (overflow_artifact, saturation_artifact):
        path = tmp_path / f"{make.__name__}.onnx"
        inputs = make(path)
        model = onnx.load(str(path))
        weights = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_q")).astype(np.int64)
        xq = np.clip(np.round(inputs[0] * 255), 0, 255).astype(np.int64).reshape(-1)
        products = xq * weights[0].reshape(-1)
        exact = products.sum()
        if make is overflow_artifact:  # 32-bit accumulation wraps
            fused = (exact + 2**31) % 2**32 - 2**31
        else:  # pairs added with 16-bit saturation, then summed in 32 bits
            fused = np.clip(products.reshape(-1, 2).sum(axis=1), -2**15, 2**15 - 1).sum()
        assert exact > 0 > fused, make.__name__




def integer_matmul(k: int, weights: np.ndarray, weight_zero_point: int) -> onnx.ModelProto:
    """``MatMulInteger(a: uint8 (M, k), weights)`` with zero points 7 and ``weight_zero_point``: ONNX Runtime's qgemm."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "a_zero", "w_zero"], ["y"])], "qgemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array(7, np.uint8), "a_zero"),
         numpy_helper.from_array(np.array(weight_zero_point, weights.dtype), "w_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("weight_type", ["s8", "u8"])
def test_onnx_runtime_integer_gemm_is_exact_on_this_cpu(weight_type):
    """ONNX Runtime's qgemm, which its INT8 convs and Gemms run on, gives the exact integer product on this CPU.

    ONNX Runtime up to 1.24.4 computes some conv-shaped products wrongly on AMX CPUs (microsoft/onnxruntime#26324,
    fixed by PR #27671: the AMX U8S8 kernel's 32-row path, and U8U8 sent to U8S8 kernels): here, on an amx_int8
    Xeon, 1.24.4 got every case with N = 24 or 58 and M >= 32 wrong, 1.25.1 and 1.31.1 none. Weights of |w| <= 64 keep
    AVX2's 16-bit pair sums exact too, so the test holds on every CPU with correct kernels.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    wrong = []
    for k, n in ((72, 24), (24, 58), (147, 64), (576, 64)):
        if weight_type == "s8":
            weights, zero_point = rng.integers(-64, 65, (k, n)).astype(np.int8), 3
        else:
            weights, zero_point = rng.integers(0, 256, (k, n)).astype(np.uint8), 131
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(integer_matmul(k, weights, zero_point).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        for m in (1, 8, 31, 32, 33, 48, 64, 200):
            a = rng.integers(0, 256, (m, k), dtype=np.uint8)
            exact = (a.astype(np.int64) - 7) @ (weights.astype(np.int64) - zero_point)
            if not np.array_equal(session.run(None, {"a": a})[0], exact):
                wrong.append((m, k, n))
    assert not wrong, (f"ONNX Runtime {ort.__version__} on {describe_cpu(cpu_info())} computes these (M, K, N) "
                       f"{weight_type} products wrongly: {wrong}")
# --------------------------------------------------------------------------- trained models, both forms


def both_forms(trained) -> dict:
    """The cpu-target INT8 of a trained model in both weight forms, verified against PyTorch."""
    out = {}
    for form in ("portable", "vnni"):
        request = PrecisionRequest("int8", trained.train, "cpu", calib_size=CALIB, val=trained.val, cpu_form=form)
        path = trained.root / f"int8_cpu_{form}.onnx"
        try:
            out[form] = precision_from_onnx(trained.fp32, path, request, reference=TorchRunner(trained.model.module))
        except GateFailed as exc:  # the vnni form on a CPU without VNNI: checked below
            out[form] = exc
    return out


@pytest.fixture(scope="module")
def digits_forms(digits):
    return both_forms(digits)


@pytest.fixture(scope="module")
def digits_r18_forms(digits_r18):
    return both_forms(digits_r18)


@pytest.fixture(scope="module", params=["digits", "digits_r18"])
def forms(request):
    """Both forms of each trained model."""
    return request.getfixturevalue(f"{request.param}_forms")


@pytest.mark.slow
def test_portable_form_is_exact_and_keeps_accuracy_on_every_cpu(forms):
    result = forms["portable"]
    metrics = result.verification.metrics
    assert metrics["accuracy_reference"] - metrics["accuracy_candidate"] <= 0.01
    assert metrics["min_cosine"] >= GATES["int8"].min_cosine
    values = weight_values(result.path)
    assert values.min() >= -64 and values.max() <= 64  # 7 bits: u8 x s8 pairs fit in 16 bits
    assert result.record.weight_bits == 7 and result.record.cpu_form == "portable"
    manifest = json.loads(result.path.with_name(result.path.name + ".json").read_text())
    kernels = manifest["verification"]["kernels"]
    assert kernels["passed"] and kernels["metrics"]["min_cosine"] >= 0.99 and kernels["metrics"]["top1_agreement"] == 1
    assert manifest["verification"]["cpu"] == cpu_info() and manifest["settings"]["cpu_form"] == "portable"
    assert manifest["conversion"]["weight_bits"] == 7


@pytest.mark.slow
def test_vnni_form_is_exact_only_where_products_add_in_32_bits(forms):
    result = forms["vnni"]
    if exact_u8s8(cpu_info()):
        values = weight_values(result.path)
        assert values.max() > 64 or values.min() < -64  # full 8-bit weights
        assert result.verification.kernels["passed"] and result.record.weight_bits == 8
    else:  # an AVX2-only CPU: the saturation is caught and named
        assert "saturation: no VNNI" in str(result)


@pytest.mark.slow
def test_verify_gates_int8_fidelity_and_applies_the_requested_gate(digits, tmp_path):
    """The saturated artifacts measured kept top-1 on most images while the logits collapsed (min cosine
    0.24-0.62). Shifting every logit of a healthy INT8 artifact by one constant keeps every top-k decision
    and collapses the cosine the same way: the INT8 gate must fail it."""
    request = PrecisionRequest("int8", digits.train, "cpu", calib_size=CALIB, val=digits.val)
    healthy = precision_from_onnx(digits.fp32, tmp_path / "int8.onnx", request,
                                  reference=TorchRunner(digits.model.module))
    model = onnx.load(str(healthy.path))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_unshifted" if o == output else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(40.0, np.float32), "shift"))
    model.graph.node.append(helper.make_node("Add", [f"{output}_unshifted", "shift"], [output]))
    doctored = tmp_path / "shifted.onnx"
    onnx.save(model, str(doctored))
    model_options = ["--model", str(digits.model.source["factory"]), "--weights", str(digits.checkpoint),
                     "--input-size", "32"]
    result = run("verify", doctored, *model_options, "--images", digits.val, "--precision", "int8")
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    error = next(line for line in result.stderr.splitlines() if line.startswith("Error: "))
    assert "failed the INT8 gate" in error and "min cosine" in error and "top-1 agreement" not in error
    good = run("verify", healthy.path, *model_options, "--images", digits.val)  # the INT8 gate, from its metadata
    assert good.exit_code == 0, good.output
    assert "INT8 (from its manifest) vs PyTorch" in good.stdout and "fused vs exact Q/DQ on this CPU" in good.stdout
    assert "when made (" in good.stdout
    strict = run("verify", healthy.path, *model_options, "--images", digits.val, "--precision", "fp32")
    assert strict.exit_code == EXIT_GATE_FAILED and "failed the FP32 gate" in strict.stderr  # the gate asked for


QEMU = shutil.which("qemu-x86_64")
ON_AVX2 = """
import json, sys
import numpy as np
import onnxruntime as ort

def run(path, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.load(sys.argv[1])})[0].astype(np.float64)

cosines = {}
for path in sys.argv[2:]:
    fused, exact = run(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), run(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    cos = (fused * exact).sum(1) / np.linalg.norm(fused, axis=1) / np.linalg.norm(exact, axis=1)
    cosines[path] = float(cos.min())
print(json.dumps(cosines))
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                    reason="needs qemu-x86_64 (apt-get install qemu-user) to emulate an AVX2-only CPU (Haswell)")
def test_on_an_avx2_only_cpu_portable_is_exact_and_vnni_saturates(digits, digits_forms, tmp_path):
    """ONNX Runtime's real AVX2 kernels, under QEMU emulating a Haswell (AVX2, no VNNI): about a minute."""
    if isinstance(digits_forms["vnni"], Exception):  # this CPU has no VNNI itself: the form failed its gate here
        pytest.skip("this CPU saturates natively: the vnni form was refused here (see the test above)")
    inputs = tmp_path / "val.npy"
    np.save(inputs, image_inputs(digits.val, digits.model.preprocessing, limit=32).array)
    paths = [str(digits_forms[form].path) for form in ("portable", "vnni")]
    script = tmp_path / "on_avx2.py"
    script.write_text(ON_AVX2)
    done = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(script), str(inputs), *paths],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cosines = json.loads(done.stdout.strip().splitlines()[-1])
    assert cosines[paths[0]] >= KERNEL_GATE.min_cosine  # 7-bit weights: the AVX2 kernels compute the graph
    assert cosines[paths[1]] < KERNEL_GATE.min_cosine  # 8-bit weights: they saturate (0.64 measured)


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                    reason="needs qemu-x86_64 (apt-get install qemu-user) to emulate an AVX2-only CPU (Haswell)")
def test_this_files_quick_tests_pass_on_an_emulated_avx2_only_cpu():
    """The quick loop's ISA-dependent tests (this file's), run again under QEMU emulating a Haswell (AVX2, no
    VNNI), where ONNX Runtime takes its AVX2 kernels whatever this machine has: none may pass only on VNNI."""
    done = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-m", "pytest", "-q", "-m", "not slow",
                           "-p", "no:cacheprovider", __file__], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
