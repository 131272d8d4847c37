"""INT8 that holds on the CPU that runs it: weight forms, the fused-vs-exact check, the fidelity gate,
calibration samples kept out of verification, and the CPU recorded in the manifest."""

import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from resnet_export.cpu import INT8_FLAGS, cpu_info, describe_cpu, exact_u8s8
from resnet_export.kernel_probe import differs, overflow_case, probe, saturation_case
from resnet_export.data import Inputs, calibration_data, image_inputs, split_counts
from resnet_export.errors import EXIT_GATE_FAILED, GateFailed
from resnet_export.source.models import default_preprocessing
from resnet_export.pipeline import PrecisionRequest, precision_from_onnx
from resnet_export.quantize.precision import PrecisionError
from resnet_export.runtime.runners import OrtRunner, TorchRunner
from resnet_export.checks.verify import GATES, KERNEL_GATE, verify

from ..conftest import IMAGES
from ..test_cli import run

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


def test_u8s8_exactness_is_what_was_measured_and_for_older_records_what_the_isa_implies():
    emulated = {**VNNI, "u8s8": {"pair_saturation": True, "int32_overflow": False}}  # QEMU Haswell on a VNNI host
    assert not exact_u8s8(emulated) and describe_cpu(emulated).endswith("u8s8 pairs saturate, measured)")
    assert exact_u8s8({**AVX2_ONLY, "u8s8": {"pair_saturation": False, "int32_overflow": True}})
    assert not exact_u8s8(AVX2_ONLY) and exact_u8s8(VNNI)  # recorded before the toolkit measured: the flags
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


def fused_differs_artifact(folder) -> tuple:
    """The construction whose fused run differs from its exact run on this CPU, chosen by the probe's measurement
    (pair saturation without VNNI, int32 overflow with it), saved under ``folder``: (path, inputs)."""
    case = saturation_case if probe()["pair_saturation"] else overflow_case
    model, inputs = case()
    path = folder / f"{case.__name__}.onnx"
    onnx.save(model, str(path))
    assert differs(model, inputs), f"{case.__name__} does not make the fused kernel differ on {describe_cpu(cpu_info())}"
    return path, inputs


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
    assert any(f.startswith("min cosine") for f in result.failures)  # the INT8 gate's own cosine, against the reference


def test_each_construction_differs_where_its_kernel_runs():
    """Both constructions, computed exactly: the fused arithmetic each stands for flips the sign of class 0."""
    for case in (overflow_case, saturation_case):
        model, inputs = case()
        weights = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_q")).astype(np.int64)
        xq = np.clip(np.round(inputs[0] * 255), 0, 255).astype(np.int64).reshape(-1)
        products = xq * weights[0].reshape(-1)
        exact = products.sum()
        if case is overflow_case:  # 32-bit accumulation wraps
            fused = (exact + 2**31) % 2**32 - 2**31
        else:  # pairs added with 16-bit saturation, then summed in 32 bits
            fused = np.clip(products.reshape(-1, 2).sum(axis=1), -2**15, 2**15 - 1).sum()
        assert exact > 0 > fused, case.__name__


def test_the_probe_measures_what_the_kernels_do_and_the_manifest_records_it():
    """cpu_info's u8s8 facts are the two constructions run now, in this test, apart from the cached probe; and one
    of them always differs (a CPU's u8s8 products add in 16 or in 32 bits)."""
    measured = {"pair_saturation": differs(*saturation_case()), "int32_overflow": differs(*overflow_case())}
    assert cpu_info()["u8s8"] == measured and any(measured.values())
    assert exact_u8s8(cpu_info()) == (not measured["pair_saturation"])
    assert describe_cpu(cpu_info()).endswith(f"u8s8 pairs {'saturate' if measured['pair_saturation'] else 'exact'}, "
                                             "measured)")


def fp32_of(model: onnx.ModelProto, path) -> None:
    """The float model a Q/DQ construction quantizes: the same conv on dequantized weights, no Q/DQ."""
    weights = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_q")).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["y"]), helper.make_node("Flatten", ["y"], ["logits"])], "fp32",
        list(model.graph.input), list(model.graph.output), [numpy_helper.from_array(weights * 0.01, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=10), str(path))


def test_the_pipelines_kernel_check_fails_by_name_on_any_cpu(tmp_path, monkeypatch):
    """The construction that differs on this CPU (whichever it is), pushed through precision_from_onnx as if the
    quantizer had made it, then through verify_artifact: both fail the kernel check by name. Comparing the fused
    run with itself (no exact=True) passes neither."""
    from resnet_export.pipeline import precision as pipeline
    from resnet_export.pipeline import verify_artifact
    from resnet_export.quantize.precision import Conversion

    differing, inputs = fused_differs_artifact(tmp_path)
    source = tmp_path / "fp32.onnx"
    fp32_of(onnx.load(str(differing)), source)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.repeat(inputs[:1], 10, axis=0))  # every sample the one that differs

    def quantizer(source, output, *args, **kwargs):  # the quantizer's output: the construction itself
        shutil.copyfile(differing, output)
        return Conversion("int8", "test seam", target="cpu", cpu_form="portable")

    monkeypatch.setattr(pipeline, "quantize_int8", quantizer)
    out = tmp_path / "int8.onnx"
    request = PrecisionRequest("int8", calib, "cpu", calib_size=10)
    with pytest.raises(GateFailed, match=re.escape("differs from the exact run of the same graph on "
                                                   + describe_cpu(cpu_info()))):
        precision_from_onnx(source, out, request, preprocessing=default_preprocessing(inputs.shape[1], inputs.shape[2:]))
    assert not json.loads(out.with_name(out.name + ".json").read_text())["verification"]["kernels"]["passed"]
    with pytest.raises(GateFailed, match="differs from the exact run of the same graph"):
        verify_artifact(out, None)  # against the reference it recorded, its exact run on this CPU too




def integer_matmul(k: int, weights: np.ndarray, weight_zero_point: int) -> onnx.ModelProto:
    """``MatMulInteger(a: uint8 (M, k), weights)`` with zero points 7 and ``weight_zero_point``: ONNX Runtime's qgemm."""
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "a_zero", "w_zero"], ["y"])], "qgemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array(7, np.uint8), "a_zero"),
         numpy_helper.from_array(np.array(weight_zero_point, weights.dtype), "w_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
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


def both_forms(trained, portable=None) -> dict:
    """The cpu-target INT8 of a trained model in both weight forms, verified against PyTorch (``portable``: that
    form's, already made)."""
    out = {"portable": portable} if portable else {}
    for form in [f for f in ("portable", "vnni") if f not in out]:
        request = PrecisionRequest("int8", trained.train, "cpu", calib_size=CALIB, val=trained.val, cpu_form=form)
        path = trained.root / f"int8_cpu_{form}.onnx"
        try:
            out[form] = precision_from_onnx(trained.fp32, path, request, reference=TorchRunner(trained.model.module))
        except GateFailed as exc:  # the vnni form on a CPU without VNNI: checked below
            out[form] = exc
    return out


@pytest.fixture(scope="module")
def digits_forms(digits, digits_cpu_int8):
    return both_forms(digits, digits_cpu_int8)


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
    recorded = manifest["verification"]["cpu"]  # this CPU, observed apart from cpu_info's cache
    assert recorded["flags"] == (proc_cpuinfo_flags() or []) and manifest["settings"]["cpu_form"] == "portable"
    assert recorded["u8s8"]["pair_saturation"] == differs(*saturation_case())
    assert manifest["conversion"]["weight_bits"] == 7


@pytest.mark.slow
def test_vnni_form_is_exact_only_where_products_add_in_32_bits(forms):
    result = forms["vnni"]
    if exact_u8s8(cpu_info()):
        values = weight_values(result.path)
        assert values.max() > 64 or values.min() < -64  # full 8-bit weights
        assert result.verification.kernels["passed"] and result.record.weight_bits == 8
    else:  # an AVX2-only CPU: the saturation is caught and named (verify.kernel_gap_message)
        assert "saturation: its u8s8 kernels add pairs of products in 16 bits (measured)" in str(result)


@pytest.mark.slow
def test_verify_gates_int8_fidelity_and_applies_the_requested_gate(digits, digits_cpu_int8, tmp_path):
    """The saturated artifacts measured kept top-1 on most images while the logits collapsed (min cosine
    0.24-0.62). Shifting every logit of a healthy INT8 artifact by one constant keeps every top-k decision
    and collapses the cosine the same way: the INT8 gate must fail it."""
    healthy = digits_cpu_int8
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
    """ONNX Runtime's real AVX2 kernels, under QEMU emulating a Haswell (AVX2, no VNNI), on 8 held-out images (each
    is a few seconds emulated: 32 took 45 s, 8 take 14 s, and they saturate as clearly)."""
    if isinstance(digits_forms["vnni"], Exception):  # this CPU has no VNNI itself: the form failed its gate here
        pytest.skip("this CPU saturates natively: the vnni form was refused here (see the test above)")
    inputs = tmp_path / "val.npy"
    np.save(inputs, image_inputs(digits.val, digits.model.preprocessing, limit=8).array)
    paths = [str(digits_forms[form].path) for form in ("portable", "vnni")]
    script = tmp_path / "on_avx2.py"
    script.write_text(ON_AVX2)
    done = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(script), str(inputs), *paths],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    cosines = json.loads(done.stdout.strip().splitlines()[-1])
    assert cosines[paths[0]] >= KERNEL_GATE.min_cosine  # 7-bit weights: the AVX2 kernels compute the graph
    assert cosines[paths[1]] < KERNEL_GATE.min_cosine  # 8-bit weights: they saturate (0.937 measured)


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                    reason="needs qemu-x86_64 (apt-get install qemu-user) to emulate an AVX2-only CPU (Haswell)")
def test_an_emulated_haswell_is_measured_as_one_whatever_the_flags_say():
    """Under QEMU emulating a Haswell (AVX2, no VNNI) ONNX Runtime takes its AVX2 kernels while /proc/cpuinfo shows
    the host's flags: the probe measures pair saturation (not int32 overflow), and cpu_info, which manifests record,
    says so beside those flags. A torch-free child: seconds, not a minute."""
    code = ("import json; from resnet_export.cpu import cpu_info, describe_cpu, exact_u8s8; info = cpu_info(); "
            "print(json.dumps({'u8s8': info['u8s8'], 'exact': exact_u8s8(info), 'describe': describe_cpu(info)}))")
    done = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent.parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    emulated = json.loads(done.stdout.strip().splitlines()[-1])
    assert emulated["u8s8"] == {"pair_saturation": True, "int32_overflow": False}
    assert emulated["exact"] is False and emulated["describe"].endswith("u8s8 pairs saturate, measured)")
