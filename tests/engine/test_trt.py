"""TensorRT layer: pure logic here; real builds where TensorRT and a GPU exist (marked, skipped otherwise)."""

import json

import pytest
import torch

from resnet_export.errors import EXIT_TRT_UNAVAILABLE
from resnet_export.engine.build import (
    BatchProfile,
    EngineBuild,
    check_profile,
    onnx_io,
    profile_batch_sizes,
    read_timing_cache,
    write_timing_cache,
)
from resnet_export.engine.tensorrt import (
    EngineError,
    RuntimeInfo,
    gpu_caveat,
    incompatibility,
    torch_dtype_name,
    unavailable_reason,
)

from ..conftest import IMAGES
from ..test_cli import assert_one_line_error, run

REASON = unavailable_reason()
skip_without_trt = pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a CUDA GPU: {REASON}")

HERE = RuntimeInfo(tensorrt="10.13.3", gpu="NVIDIA L4", compute_capability="8.9", platform="linux-x86_64",
                   cuda_driver="12.8", tensorrt_cuda="12")
#: A plan manifest's fields as the build writes them (EngineBuild.to_dict), built on HERE.
BUILT = EngineBuild(runtime=HERE, onnx="m.onnx", onnx_sha256="0" * 64, precision={"dtype": "fp32"}, profile={},
                    build_seconds=1.0, options={}, io=[]).to_dict()


def running(**changes) -> RuntimeInfo:
    """HERE with ``changes``: the machine a plan is run on."""
    from dataclasses import replace

    return replace(HERE, **changes)


def test_profile_validation():
    assert check_profile(BatchProfile(1, 8, 32), None) == BatchProfile(1, 8, 32)
    with pytest.raises(EngineError, match="need 1 <= `min_batch` <= `opt_batch` <= `max_batch`"):
        check_profile(BatchProfile(4, 2, 32), None)
    assert check_profile(BatchProfile(), 4) == BatchProfile(4, 4, 4)  # a fixed batch pins the profile
    with pytest.raises(EngineError, match="fixed batch of 4"):
        check_profile(BatchProfile(1, 2, 8), 4)


def test_onnx_io_reads_the_input(resnet18_onnx):
    assert onnx_io(resnet18_onnx.path) == ("input", None, (3, 64, 64))


def test_the_cuda_tensorrt_runs_on_is_read_from_the_driver_and_the_wheel():
    from resnet_export.engine.tensorrt import cuda_driver_version, cuda_version_text, tensorrt_cuda_major

    assert cuda_version_text(12080) == "12.8" and cuda_version_text(13000) == "13.0"
    assert tensorrt_cuda_major(["numpy", "tensorrt-cu12", "tensorrt"]) == "12"
    assert tensorrt_cuda_major(["tensorrt_cu13_libs"]) == "13" and tensorrt_cuda_major(["torch"]) is None
    import ctypes.util

    if ctypes.util.find_library("cuda") is None:  # no NVIDIA driver here: nothing to read, and nothing invented
        assert cuda_driver_version() is None


def test_manifest_fields_are_the_runtime_and_the_build():
    assert list(BUILT)[:6] == ["tensorrt", "gpu", "compute_capability", "platform", "cuda_driver", "tensorrt_cuda"]
    assert BUILT["platform"] == "linux-x86_64" and "runtime" not in BUILT


def test_same_machine_is_compatible_and_another_gpu_model_is_a_caveat():
    assert incompatibility(BUILT, HERE) is None and gpu_caveat(BUILT, HERE) is None
    rtx = running(gpu="NVIDIA GeForce RTX 4090")  # same compute capability, 8.9
    assert incompatibility(BUILT, rtx) is None
    assert "built on NVIDIA L4 and runs on NVIDIA GeForce RTX 4090" in gpu_caveat(BUILT, rtx)
    assert gpu_caveat({**BUILT, "options": {"hardware_compatible": True}}, rtx) is None


def test_mismatch_messages_say_both_sides():
    message = incompatibility(BUILT, running(tensorrt="11.4.0", compute_capability="9.0", gpu="NVIDIA H100"))
    assert message == ("built with TensorRT 10.13.3 on compute capability 8.9 (NVIDIA L4, linux-x86_64), running "
                       "TensorRT 11.4.0 on compute capability 9.0 (NVIDIA H100, linux-x86_64): TensorRT and GPU mismatch")
    assert incompatibility(BUILT, running(tensorrt="10.13.4")).endswith("TensorRT mismatch")
    assert incompatibility(BUILT, running(compute_capability="8.6")).endswith("GPU mismatch")


def test_a_plan_runs_only_on_the_platform_that_built_it():
    """An x86_64 H100 and an aarch64 GH200 are both 9.0; no compatibility option makes a plan cross platforms."""
    h100 = {**BUILT, "compute_capability": "9.0", "gpu": "NVIDIA H100", "options": {"hardware_compatible": True,
                                                                                  "version_compatible": True}}
    gh200 = running(compute_capability="9.0", gpu="NVIDIA GH200", platform="linux-aarch64")
    assert incompatibility(h100, gh200).endswith("(NVIDIA GH200, linux-aarch64): platform mismatch")
    from resnet_export.engine.tensorrt import this_platform

    assert this_platform().count("-") == 1 and this_platform() == this_platform().lower()


def test_compatibility_options_widen_what_runs():
    built = {**BUILT, "options": {"version_compatible": True, "hardware_compatible": True}}
    assert incompatibility(built, running(tensorrt="10.14.1", compute_capability="9.0")) is None
    assert incompatibility(built, running(tensorrt="11.0.0")) is None  # 10 -> 11 is supported
    assert "TensorRT mismatch" in incompatibility(built, running(tensorrt="12.0.0"))
    assert "TensorRT mismatch" in incompatibility(built, running(tensorrt="10.12.0"))
    eleven = {**built, "tensorrt": "11.4.0"}
    assert "TensorRT mismatch" in incompatibility(eleven, running(tensorrt="10.14.1"))
    assert incompatibility({**BUILT, "tensorrt": "8.6.1", "options": {"version_compatible": True}},
                           running(tensorrt="10.0.1")) is None
    assert "GPU mismatch" in incompatibility(built, running(compute_capability="7.5"))


def test_a_manifest_without_versions_is_a_clear_mismatch():
    assert incompatibility({"onnx": "m.onnx"}, HERE) == (
        "its manifest does not record the tensorrt, compute_capability, platform that built it")
    assert "does not record the platform" in incompatibility({**BUILT, "platform": None}, HERE)


def test_profile_batch_sizes_and_io_types():
    assert profile_batch_sizes(1, 8, 32) == [1, 8, 32] and profile_batch_sizes(4, 4, 4) == [4]
    assert profile_batch_sizes(1, 32, 32) == [1, 32]
    assert torch_dtype_name("HALF", "logits") == "float16" and torch_dtype_name("BF16", "x") == "bfloat16"
    assert torch_dtype_name("INT64", "x") == "int64" and torch_dtype_name("BOOL", "x") == "bool"
    with pytest.raises(EngineError, match="'x' has data type FP8, which this runner cannot feed"):
        torch_dtype_name("FP8", "x")


def test_timing_cache_files(tmp_path):
    cache = tmp_path / "timing.cache"
    assert read_timing_cache(None) == b"" and read_timing_cache(cache) == b""
    write_timing_cache(cache, b"\x01\x02tactics")
    assert read_timing_cache(cache) == b"\x01\x02tactics"
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]


def test_concurrent_builds_keep_each_others_timing_cache_entries(tmp_path):
    """Two processes save at once; without the lock the last writer would drop the other's entry."""
    import multiprocessing

    from ..timing_cache_saver import save_entry

    cache = tmp_path / "timing.cache"
    write_timing_cache(cache, b"earlier build\n")
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(2)
    builds = [context.Process(target=save_entry, args=(str(cache), f"build {i}", ready)) for i in range(2)]
    for build in builds:
        build.start()
    for build in builds:
        build.join(timeout=60)
        assert build.exitcode == 0
    assert cache.read_bytes().splitlines() == [b"build 0", b"build 1", b"earlier build"]


def test_engine_files_are_keyed_on_tensorrt_gpu_model_and_platform():
    """An L4 and an RTX 4090 share compute capability 8.9 but not a timing cache (setTimingCache refuses it)."""
    from resnet_export.engine.tensorrt import engine_key

    assert engine_key(HERE) == "trt10.13.3-sm89-nvidia-l4-linux-x86_64"
    others = ({}, {"tensorrt": "11.4.0"}, {"compute_capability": "9.0"}, {"gpu": "NVIDIA GeForce RTX 4090"},
              {"platform": "linux-aarch64"}, {"cuda_driver": "13.0"})
    assert len({engine_key(running(**other)) for other in others}) == 5


#: The DETAILED layer record of NVIDIA's TensorRT developer guide ("Engine Inspector"), trimmed: an INT8 conv.
DETAILED = {"Layers": [
    {"Name": "node_of_gpu_0/res4_0_branch2a_1 + node_of_gpu_0/res4_0_branch2a_bn_1", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "gpu_0/res3_3_branch2c_bn_3", "Dimensions": [16, 512, 28, 28],
                 "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
     "Outputs": [{"Name": "gpu_0/res4_0_branch2a_bn_2", "Dimensions": [16, 256, 28, 28],
                  "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
     "ParameterType": "Convolution", "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32"},
    {"Name": "fc", "LayerType": "CaskGemmConvolution",
     "Inputs": [{"Name": "pool", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
     "Outputs": [{"Name": "logits", "Format/Datatype": "Row major linear FP32"}], "TacticValue": "0x0000000000000003"},
    {"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat",
     "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear BFloat16 format"}],
     "Outputs": [{"Name": "y", "Format/Datatype": "N/A due to dynamic shapes"}]},
], "Bindings": ["input", "logits"]}


def test_layer_precisions_are_read_from_the_engine_inspector():
    from resnet_export.engine.inspector import convolution_precisions, engine_layers

    layers = engine_layers(DETAILED)
    assert [(layer["inputs"], layer["outputs"]) for layer in layers] == [
        (["INT8"], ["INT8"]), (["FP16"], ["FP32"]), (["BF16"], ["N/A due to dynamic shapes"])]
    assert layers[0]["tactic"].startswith("sm80_xmma") and layers[1]["tactic"] == "0x0000000000000003"
    assert convolution_precisions(layers) == {"INT8": 1, "FP16": 1}
    assert engine_layers({"Layers": ["conv1 + relu", "fc"], "Bindings": []}) is None  # built with names only


def test_inspect_report_shows_each_layer_and_the_convs_by_precision():
    from rich.console import Console

    from resnet_export.console import print_layers
    from resnet_export.engine.inspector import convolution_precisions, engine_layers

    out = Console(record=True, width=200)
    layers = engine_layers(DETAILED)
    print_layers(out, layers, convolution_precisions(layers))
    text = out.export_text()
    assert "Layers (3)" in text and "CaskConvolution" in text and "Convolutions by input precision: INT8 1, FP16 1" in text
    print_layers(out, None, None)
    assert "names only" in out.export_text()


@pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are present")
def test_verify_a_plan_without_tensorrt_exits_4(tmp_path):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"not built here")
    (tmp_path / "x.plan.json").write_text(json.dumps({"precision": {"dtype": "fp16"}}))
    result = run("verify", plan, "--arch", "resnet18", "--num-classes", "5", "--input-size", "64")
    assert_one_line_error(result, "cannot run", code=EXIT_TRT_UNAVAILABLE)


def test_trt_rejects_an_inconsistent_profile_before_any_work(tmp_path):
    result = run("trt", "--arch", "resnet18", "--min-batch", "8", "--opt-batch", "4", "-o", tmp_path / "x.plan")
    assert_one_line_error(result, "inconsistent batch profile min=8 opt=4 max=32")
    assert list(tmp_path.iterdir()) == []


def test_verify_command_on_onnx(resnet18_onnx, resnet18_small, tmp_path):
    checkpoint = tmp_path / "r18.pth"
    torch.save(resnet18_small.module.state_dict(), checkpoint)
    args = ["--arch", "resnet18", "--num-classes", "5", "--input-size", "64", "--images", IMAGES]
    result = run("verify", resnet18_onnx.path, *args, "--weights", checkpoint)
    assert result.exit_code == 0, result.output
    assert "FP32 (from its manifest) vs PyTorch FP32 on 6 images" in result.stdout and "PASS" in result.stdout
    other = run("verify", resnet18_onnx.path, *args, "--seed", "7")  # another (random) model
    assert_one_line_error(other, "failed the FP32 gate", code=3)


def test_inspect_onnx(resnet18_onnx):
    result = run("inspect", resnet18_onnx.path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["counts"]["batchnorms"] == 0 and info["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert info["manifest"]["verification"]["passed"]
    from ..quantize.test_cpu_int8 import proc_cpuinfo_flags

    from resnet_export.kernel_probe import differs, overflow_case, saturation_case

    measured = {"pair_saturation": differs(*saturation_case()), "int32_overflow": differs(*overflow_case())}
    for machine in ("verified_on", "this_machine"):  # verified here by the session: both this CPU, observed apart
        assert info["cpu"][machine]["flags"] == (proc_cpuinfo_flags() or []) and info["cpu"][machine]["u8s8"] == measured
    report = run("inspect", resnet18_onnx.path)  # for a person: tables, not JSON
    assert report.exit_code == 0, report.output
    for part in ("Inputs and outputs", "Precision", "Preprocessing: shorter side to 73 (bilinear), center crop 64x64",
                 "Verification: PASS vs PyTorch FP32 on 6 images", "min cosine", ">= 0.99999", "Verified on", "Op mix: Conv 20"):
        assert part in report.stdout, part
    assert not report.stdout.lstrip().startswith("{")


# --------------------------------------------------------------------------- real TensorRT


@pytest.fixture(scope="module")
def engines(tmp_path_factory, resnet18_small):
    """resnet18 engines in FP32, FP16 and INT8, built through the CLI's own pipeline."""
    from resnet_export.pipeline import PrecisionRequest, engine_from_onnx, onnx_from_model, precision_from_onnx
    from resnet_export.runtime.runners import TorchRunner

    folder = tmp_path_factory.mktemp("engines")
    reference = TorchRunner(resnet18_small.module)
    fp32 = onnx_from_model(resnet18_small, folder / "fp32.onnx", images=IMAGES).path
    onnx_files = {
        "fp32": fp32,
        "fp16": precision_from_onnx(fp32, folder / "fp16.onnx", PrecisionRequest("fp16"), reference=reference).path,
        "int8": precision_from_onnx(fp32, folder / "int8.onnx", PrecisionRequest("int8", IMAGES, min_agreement=0.0,
                                    max_accuracy_drop=100), reference=reference).path,  # random weights
    }
    profile = BatchProfile(1, 4, 8)
    return {p: engine_from_onnx(path, folder / f"{p}.plan", profile=profile, reference=reference)
            for p, path in onnx_files.items()}


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_builds_runs_and_verifies(engines, precision):
    result = engines[precision]
    assert result.verification.passed and result.verification.batch_sizes == [1, 4, 8]  # min, opt and max
    manifest = json.loads(result.path.with_name(result.path.name + ".json").read_text())
    assert manifest["precision"]["dtype"] == precision and manifest["compute_capability"]
    assert manifest["verification"]["passed"] and manifest["profile"]["max"][0] == 8



@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_rebuild_ignores_the_stale_manifest_of_the_plan_it_replaces(resnet18_onnx, tmp_path):
    from resnet_export.pipeline import engine_from_onnx

    plan = tmp_path / "r18.plan"
    stale = {**BUILT, "tensorrt": "9.0.0", "compute_capability": "1.0"}  # as if built elsewhere
    (tmp_path / "r18.plan.json").write_text(json.dumps(stale))
    result = engine_from_onnx(resnet18_onnx.path, plan, profile=BatchProfile(2, 4, 6))
    assert result.verification.passed and result.verification.batch_sizes == [2, 4, 6]  # min, opt and max
    assert json.loads((tmp_path / "r18.plan.json").read_text())["tensorrt"] != "9.0.0"


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_runner_refuses_a_batch_outside_the_profile_and_graphs_keep_outputs(engines):
    import numpy as np

    from resnet_export.engine.runner import TrtRunner

    plan = engines["fp32"].path
    plain, graphs = TrtRunner(plan), TrtRunner(plan, cuda_graph=True)
    with pytest.raises(EngineError, match="outside the engine's profile"):
        plain.infer(np.zeros((9, 3, 64, 64), np.float32))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 64, 64), dtype=np.float32) for n in (2, 4, 2, 4)]
    kept = [graphs.infer_device(torch.from_numpy(b).cuda()) for b in batches]  # shapes alternate
    for batch, out in zip(batches, kept):
        np.testing.assert_allclose(out.cpu().numpy(), plain.infer(batch), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_every_build_option_reaches_the_builder_and_its_manifest(resnet18_onnx, tmp_path):
    out = tmp_path / "opts.plan"
    cache = tmp_path / "timing.cache"
    result = run("trt", "--onnx", resnet18_onnx.path, "--workspace", "512", "--timing-cache", cache,
                 "--builder-opt-level", "1", "--version-compatible", "--hardware-compat",
                 "--min-batch", "1", "--opt-batch", "2", "--max-batch", "4", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "opts.plan.json").read_text())
    assert manifest["options"] == {"workspace_mib": 512, "timing_cache": str(cache), "builder_optimization_level": 1,
                                   "version_compatible": True, "hardware_compatible": True}
    assert cache.is_file() and cache.stat().st_size > 0  # saved after the build
    assert manifest["cuda_driver"] and manifest["verification"]["passed"]


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_an_unusable_timing_cache_is_a_one_line_error_and_is_kept(resnet18_onnx, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"not a timing cache from this TensorRT")
    result = run("trt", "--onnx", resnet18_onnx.path, "--timing-cache", cache, "-o", tmp_path / "r.plan")
    assert_one_line_error(result, "timing cache")
    assert cache.read_bytes() == b"not a timing cache from this TensorRT" and not (tmp_path / "r.plan").exists()


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_enqueue_returns_before_the_gpu_is_done_and_infer_device_waits(engines):
    """What `bench` times between CUDA events: no host synchronization inside the call."""
    import numpy as np

    from resnet_export.engine.runner import TrtRunner

    runner = TrtRunner(engines["fp32"].path)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 64, 64), dtype=np.float32)).cuda()
    expected = runner.infer_device(x).cpu()
    with torch.cuda.stream(runner.stream):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the engine
    out = runner.enqueue(x)
    assert not runner.stream.query()  # returned while the stream still works
    runner.stream.synchronize()
    torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_captured_shapes_share_one_activation_block(engines):
    import numpy as np

    from resnet_export.engine.runner import TrtRunner

    runner = TrtRunner(engines["fp16"].path, cuda_graph=True)
    block = runner.scratch.numel()
    runner.infer(np.zeros((1, 3, 64, 64), np.float32))
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    for batch in (2, 4, 8):  # three more contexts and graphs
        runner.infer(np.zeros((batch, 3, 64, 64), np.float32))
    torch.cuda.synchronize()
    assert len(runner._graphs) == 4 and runner.scratch.numel() == block
    assert free_before - torch.cuda.mem_get_info()[0] < block  # not one block per shape


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_capture_holds_while_another_thread_uses_cuda(engines):
    """Thread-local capture (trtexec's mode): another thread's cudaMalloc, a "potentially unsafe" call that
    a global-mode capture forbids in every thread (CUDA runtime API, cudaThreadExchangeStreamCaptureMode),
    neither fails nor breaks the capture. (Not a device synchronize: that conflicts with capture in any mode.)"""
    import ctypes
    import threading

    import numpy as np

    from resnet_export.engine.runner import TrtRunner

    runner = TrtRunner(engines["fp32"].path, cuda_graph=True)
    with open("/proc/self/maps") as maps:  # the CUDA runtime torch loaded, called as is
        cudart = ctypes.CDLL(next(line.split()[-1] for line in maps if "libcudart.so" in line))
    stop, failures = threading.Event(), []

    def allocate():
        pointer = ctypes.c_void_p()
        while not stop.is_set():
            code = cudart.cudaMalloc(ctypes.byref(pointer), 1 << 20) or cudart.cudaFree(pointer)
            if code:
                failures.append(code)

    thread = threading.Thread(target=allocate)
    thread.start()
    try:
        for batch in (1, 2, 4, 8):
            runner.infer(np.zeros((batch, 3, 64, 64), np.float32))
    finally:
        stop.set()
        thread.join()
    assert failures == [] and runner.cuda_graph and len(runner._graphs) == 4


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_one_tensorrt_logger_per_process(engines, capfd):
    """TensorRT warns when a Builder or Runtime gets another logger than the first one of the process."""
    from resnet_export.engine.runner import TrtRunner
    from resnet_export.engine.tensorrt import logger

    capfd.readouterr()
    TrtRunner(engines["fp32"].path), TrtRunner(engines["fp16"].path)
    assert logger() is logger()
    assert "differs from one already provided" not in capfd.readouterr().err


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_inspect_shows_the_int8_convs_of_an_int8_plan(engines):
    from resnet_export.deploy.describe import describe

    engine = describe(engines["int8"].path)["engine"]
    assert engine["layers"] and engine["convolutions"].get("INT8", 0) > 0
    assert not any("N/A" in p for layer in engine["layers"] for p in layer["inputs"] + layer["outputs"])


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_verify_on_another_gpu_says_why_in_one_line(engines, tmp_path):
    import shutil

    plan = tmp_path / "elsewhere.plan"
    shutil.copyfile(engines["fp32"].path, plan)
    manifest = json.loads(engines["fp32"].path.with_name(engines["fp32"].path.name + ".json").read_text())
    (tmp_path / "elsewhere.plan.json").write_text(json.dumps({**manifest, "compute_capability": "1.0"}))
    result = run("verify", plan, "--arch", "resnet18", "--num-classes", "5", "--input-size", "64")
    assert_one_line_error(result, "cannot run here: built with TensorRT")
    assert "compute capability 1.0" in result.output and "GPU mismatch" in result.output


@pytest.mark.gpu
@pytest.mark.trt
@skip_without_trt
def test_concurrent_builds_merge_their_timing_caches(engines, tmp_path):
    """Two `trt` builds at once into one cache end with more entries than either alone."""
    import subprocess
    import sys

    sources = [engines[p].record.onnx for p in ("fp32", "fp16")]

    def build(onnx, cache, out):
        return subprocess.Popen([sys.executable, "-m", "resnet_export", "trt", "--onnx", onnx, "--timing-cache",
                                 cache, "--max-batch", "8", "-o", out])

    alone = []
    for i, onnx in enumerate(sources):
        assert build(onnx, tmp_path / f"alone{i}.cache", tmp_path / f"alone{i}.plan").wait() == 0
        alone.append((tmp_path / f"alone{i}.cache").stat().st_size)
    both = [build(onnx, tmp_path / "shared.cache", tmp_path / f"both{i}.plan") for i, onnx in enumerate(sources)]
    assert [p.wait() for p in both] == [0, 0]
    assert (tmp_path / "shared.cache").stat().st_size > max(alone)
