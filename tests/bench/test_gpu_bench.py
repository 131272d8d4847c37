"""The GPU benchmark's rules, on the test device seam (a host device whose clock is known) and on the TensorRT double.

What only a real GPU shows (captures that wait for no other stream, TF32, real timings) is in tests/runtime/test_device.py
and `make gpu-check`.
"""

import json

import numpy as np
import pytest
import torch

from resnet_export.bench.rows import Row
from resnet_export.bench.harness import Settings, add_speedups, row_name, run_matrix

from ..test_cli import run
from ..trt_double import HostDevice, install
from ..user_models import cifar_resnet

#: The seconds the fixed-clock device says every call took: its rows' img/s are exactly batch / this.
FIXED = 0.004


class FixedClockDevice(HostDevice):
    """A host device whose clock reports every call as taking ``FIXED`` seconds (it still runs the call)."""

    clock = "fixed test clock"

    def time(self, call, stream=None, calls=1):
        for _ in range(calls):
            call()
        return [FIXED] * calls


def _row(backend, precision, batch, img_s, device="cpu", streams=1):
    return Row(backend, precision, batch, throughput=img_s, device=device, streams=streams,
               clock="wall clock" if device == "cpu" else "CUDA events")


def test_speedups_divide_by_pytorch_on_the_same_device_only():
    """A GPU row divides by PyTorch FP32 on its GPU as PyTorch runs it by default (TF32 convolutions; not the strict FP32
    row), a CPU row by PyTorch on the CPU; a device without a PyTorch FP32 row gets no speed-up (never one from another device); vs best torch divides by the fastest PyTorch row."""
    gpu, other = "NVIDIA H200", "NVIDIA L4"
    rows = [_row("torch", "fp32", 8, 40.0), _row("ort", "fp32", 8, 100.0),
            _row("torch", "fp32", 8, 6000.0, gpu), _row("torch", "fp32", 8, 3000.0, gpu),
            _row("torch", "fp16", 8, 12000.0, gpu),
            _row("torch-compile", "fp16", 8, 24000.0, gpu), _row("ort-cuda", "fp16", 8, 18000.0, gpu),
            _row("trt", "fp16", 8, 30000.0, gpu), _row("trt", "fp16", 8, 50000.0, gpu, streams=2),
            _row("trt", "fp16", 8, 9000.0, other), _row("ort", "fp32", 1, 10.0)]
    rows[2].tf32, rows[3].tf32 = True, False  # PyTorch's default TF32, and strict FP32: never the baseline
    add_speedups(rows)
    by = {(r.backend, r.precision, r.batch, r.device, r.streams): r for r in rows if r.tf32 is not False}
    assert rows[3].speedup_vs_torch == pytest.approx(3000 / 6000)
    assert by["ort", "fp32", 8, "cpu", 1].speedup_vs_torch == pytest.approx(100 / 40)
    assert by["trt", "fp16", 8, gpu, 1].speedup_vs_torch == pytest.approx(30000 / 6000)
    assert by["trt", "fp16", 8, gpu, 1].baseline == f"torch fp32 b8 on {gpu} (CUDA events)"
    assert by["trt", "fp16", 8, gpu, 2].speedup_vs_torch == pytest.approx(50000 / 6000)
    assert by["ort-cuda", "fp16", 8, gpu, 1].speedup_vs_best_torch == pytest.approx(18000 / 24000)
    assert by["trt", "fp16", 8, gpu, 1].best_torch == f"torch-compile fp16 b8 on {gpu} (CUDA events)"
    assert by["ort", "fp32", 8, "cpu", 1].speedup_vs_best_torch == pytest.approx(100 / 40)
    for lonely in (by["trt", "fp16", 8, other, 1], by["ort", "fp32", 1, "cpu", 1]):  # no PyTorch row of its own
        assert lonely.speedup_vs_torch is None and lonely.baseline is None and lonely.speedup_vs_best_torch is None
    assert by["torch-compile", "fp16", 8, gpu, 1].speedup_vs_best_torch is None  # PyTorch rows are the reference


@pytest.fixture
def fixed_device(monkeypatch):
    device = FixedClockDevice(name="Fixed-clock test GPU")
    install(monkeypatch, device=device)
    return device


def _small():
    from resnet_export.source.models import load_model

    from ..conftest import randomize_batchnorm

    model = load_model(model="tests/user_models.py:cifar_resnet", input_size=(32, 32), resize=32)
    randomize_batchnorm(model.module)
    return model


def test_pytorch_fp32_runs_on_the_gpu_and_on_the_cpu_only_for_cpu_rows(fixed_device, tmp_path):
    """With a GPU visible PyTorch FP32 runs on it, timed by the device's clock, as PyTorch runs it by default (TF32
    convolutions: the baseline) and strict (TF32 off: a fidelity reference, not a baseline); CPU rows bring PyTorch on
    the CPU as their own baseline. Every row names its device and clock."""
    model = _small()
    settings = Settings(batch_sizes=(2,), warmup=0, iters=2, rounds=1)
    rows, env = run_matrix(model, ("torch", "ort"), ("fp32",), settings, tmp_path / "a")
    by = {(r.backend, r.device, r.tf32): r for r in rows}
    gpu_torch, cpu_torch, ort = by["torch", fixed_device.name, True], by["torch", "cpu", None], by["ort", "cpu", None]
    strict = by["torch", fixed_device.name, False]
    assert gpu_torch.clock == "fixed test clock" and gpu_torch.timing.startswith("fixed test clock on the runner's stream")
    assert gpu_torch.throughput == pytest.approx(2 / FIXED) and "TF32 convolutions (PyTorch's default)" in gpu_torch.timing
    assert "TF32 off (strict FP32)" in strict.timing and strict.baseline == row_name(gpu_torch)
    assert gpu_torch.gate == strict.gate == ort.gate == "passed"
    assert (cpu_torch.clock, cpu_torch.timing) == ("wall clock", "wall clock, CPU") and cpu_torch.throughput != 2 / FIXED
    assert ort.speedup_vs_torch == pytest.approx(ort.throughput / cpu_torch.throughput)
    assert gpu_torch.speedup_vs_torch == 1.0 and gpu_torch.top1_agreement == 1.0 and gpu_torch.max_abs_err < 1e-5
    assert env["gpu"] == fixed_device.name
    alone, _ = run_matrix(model, ("torch",), ("fp32",), settings, tmp_path / "b")
    assert [r.device for r in alone] == [fixed_device.name] * 2  # no CPU row where no CPU row needs a baseline


def test_pytorch_fp16_and_bf16_run_channels_last_and_replay_a_graph_per_shape(fixed_device):
    from resnet_export.runtime.device_runners import TorchDeviceRunner

    module = cifar_resnet().eval()
    rng = np.random.default_rng(0)
    for precision, dtype, tolerance in (("fp16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 2e-2)):
        runner = TorchDeviceRunner(module, precision)
        conv = runner.module.stem.weight
        assert conv.dtype == dtype and conv.is_contiguous(memory_format=torch.channels_last) and runner.cuda_graph
        for batch in (1, 3, 3):  # the second batch of 3 replays the graph captured for that shape
            x = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
            eager = module(torch.from_numpy(x)).detach().numpy()
            np.testing.assert_allclose(runner.infer(x), eager, atol=tolerance * np.abs(eager).max() * 10)
        assert sorted(runner._graphs) == [(1, 3, 32, 32), (3, 3, 32, 32)]
        assert runner.settings() == "channels_last, CUDA graph"
    fp32 = TorchDeviceRunner(module, "fp32")
    assert not fp32.cuda_graph and fp32.settings() == "NCHW, TF32 convolutions (PyTorch's default)"
    assert fp32.module.stem.weight.is_contiguous()  # NCHW: the plain eager baseline


def test_a_row_whose_cuda_graph_capture_failed_is_an_error_not_a_row_without_a_graph(fixed_device, monkeypatch):
    from resnet_export.bench.harness import check_runners, make_runners

    monkeypatch.setattr(fixed_device, "capture", lambda stream, enqueue, pool=None: None)  # every capture fails
    artifacts = type("A", (), {"loaded": _small()})()
    x = np.zeros((2, 3, 32, 32), np.float32)
    timed = make_runners("torch", "fp16", artifacts, Settings())
    row = check_runners("torch", "fp16", 2, timed, x, None, Settings())[0].row
    assert row.status == "error" and "CUDA graph capture failed" in row.reason and "CUDA graph" in row.timing


def test_onnx_runtime_with_its_input_and_output_bound_on_the_device_computes_what_a_session_does(
        fixed_device, resnet18_onnx):
    """OrtDeviceRunner binds device buffers (IO binding); on the host device it binds host memory with the CPU
    provider, the same code path but for the provider's stream option."""
    from resnet_export.runtime.device_runners import OrtDeviceRunner
    from resnet_export.runtime.runners import OrtRunner

    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    bound = OrtDeviceRunner(resnet18_onnx.path, provider="CPUExecutionProvider")
    assert bound.settings() == "NHWC, IO binding, TF32 off"
    np.testing.assert_array_equal(bound.infer(x), OrtRunner(resnet18_onnx.path).infer(x))
    np.testing.assert_array_equal(bound.clone().infer(x[:1]), OrtRunner(resnet18_onnx.path).infer(x[:1]))
    graph = OrtDeviceRunner(resnet18_onnx.path, provider="CPUExecutionProvider", cuda_graph=True)
    assert graph.settings() == "NHWC, IO binding, ONNX Runtime's CUDA graph (buffers bound once per batch), TF32 off"
    for batch in (x, x[:1], x[::-1].copy()):  # a session per batch shape, its buffers bound once and refilled
        np.testing.assert_array_equal(graph.infer(batch), OrtRunner(resnet18_onnx.path).infer(batch))
    assert sorted(graph._bound) == [(1, 3, 64, 64), (3, 3, 64, 64)]
    session, *_ = graph._bound[1, 3, 64, 64]
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]  # its batch fixed for the provider's graph


def test_tf32_is_set_for_the_call_and_restored():
    """Through the flags torch's own code reads: after it, torch.export still runs (mixing torch's two TF32 APIs
    makes that read raise)."""
    from resnet_export.runtime.device_runners import tf32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    with tf32(False):
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
    with tf32(True):
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
    assert (cudnn.allow_tf32, matmul.allow_tf32) == before
    torch.export.export(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),))


@pytest.mark.slow
def test_torch_compile_on_the_cpu_reports_its_compile_time_apart_and_is_checked(tmp_path):
    """Inductor on the CPU (no GPU visible): an FP32 row whose first call per batch (the compile) is reported as
    compile time and kept out of the timed calls, its outputs checked against PyTorch like every row."""
    model = _small()
    rows, _ = run_matrix(model, ("torch", "torch-compile"), ("fp32", "fp16"), Settings(batch_sizes=(2,), warmup=1,
                         iters=3, rounds=1), tmp_path)
    by = {(r.backend, r.precision): r for r in rows}
    compiled = by["torch-compile", "fp32"]
    assert compiled.status == "ok" and compiled.device == "cpu" and "torch.compile (inductor)" in compiled.timing
    assert compiled.compile_seconds > 10 * compiled.latency_ms["p99"] / 1e3  # the compile is not a timed call
    assert compiled.max_abs_err < 1e-4 and compiled.top1_agreement == 1.0
    assert compiled.speedup_vs_torch == pytest.approx(compiled.throughput / by["torch", "fp32"].throughput)
    assert by["torch-compile", "fp16"].status == "skipped" and "FP16 and BF16 on the GPU" in by["torch-compile", "fp16"].reason


@pytest.mark.slow
def test_tensorrt_rows_with_a_cuda_graph_and_under_concurrency_on_the_double(trt_double, tmp_path):
    """--cuda-graph adds a row per plan replaying a graph; --streams 2 adds, per row on the device, a row of two
    runners (one stream and thread each): aggregate img/s, per-request latency, every runner's outputs checked."""
    report = tmp_path / "report"
    result = run("bench", "--model", "tests/user_models.py:cifar_resnet", "--input-size", "32", "--resize", "32",
                 "--backends", "torch,trt", "--precisions", "fp32", "--batch-sizes", "2", "--warmup", "0", "--iters",
                 "4", "--rounds", "2", "--cuda-graph", "--streams", "2", "--report", report)
    assert result.exit_code == 0, result.output
    rows = json.loads((report / "report.json").read_text())["rows"]
    trt = [r for r in rows if r["backend"] == "trt"]
    streams = "wall clock, 2 streams"
    assert [(("CUDA graph" in r["timing"]), r["streams"], r["clock"]) for r in trt] == [
        (False, 1, trt_double.clock), (False, 2, streams), (True, 1, trt_double.clock), (True, 2, streams),
        (False, 1, "wall clock")]
    for row in trt:
        assert row["status"] == "ok" and row["top1_agreement"] == 1.0, row
        assert row["iterations"] == 4 * row["streams"]  # each runner's thread made every timed request
    concurrent = trt[1]
    assert concurrent["timing"].startswith("wall clock per request, 2 streams (a runner and thread each)")
    assert concurrent["speedup_vs_torch"] and concurrent["baseline"].startswith("torch fp32 b2 on " + trt_double.name)


@pytest.mark.slow
def test_bench_plan_times_a_plan_you_bring_with_the_reference_its_manifest_names(trt_double, tmp_path):
    import shutil

    onnx, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    assert run("onnx", "--model", "tests/user_models.py:cifar_resnet", "--input-size", "32", "--resize", "32",
               "-o", onnx).exit_code == 0
    built = run("trt", "--onnx", onnx, "--fp16", "--opt-batch", "4", "--max-batch", "4", "-o", plan)
    assert built.exit_code == 0, built.output
    result = run("bench", "--plan", plan, "--batch-sizes", "1,4,8", "--iters", "2", "--warmup", "0", "--report",
                 tmp_path / "r")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
    assert {r["precision"] for r in rows} == {"fp16"}  # from its manifest
    assert [(r["batch"], r["status"]) for r in rows if r["status"] != "ok"] == [(8, "skipped")]
    assert "outside the plan's profile (batch 1 to 4)" in rows[-1]["reason"]
    assert all(r["max_abs_err"] < 1e-2 for r in rows if r["status"] == "ok")
    assert ("checked against FP32 ONNX m.onnx (on ONNX Runtime; it matched PyTorch FP32 to a relative error of"
            in result.output and "logits recorded at quantize time on" in result.output)
    bare = tmp_path / "bare.plan"
    shutil.copyfile(plan, bare)  # no manifest: timed, and the report says its outputs were not checked
    result = run("bench", "--plan", bare, "--batch-sizes", "2", "--iters", "2", "--warmup", "0", "--report", tmp_path / "b")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b" / "report.json").read_text())["rows"]
    assert {(r["precision"], r["top1_agreement"]) for r in rows} == {("unknown", None)}
    assert "outputs not checked: the plan has no manifest" in (tmp_path / "b" / "report.md").read_text()


def test_bench_plan_refuses_matrix_options(tmp_path):
    (tmp_path / "x.plan").write_bytes(b"not read")
    result = run("bench", "--plan", tmp_path / "x.plan", "--backends", "torch", "--report", tmp_path / "r")
    assert result.exit_code == 2 and "--plan times that plan alone" in result.output and "--backends" in result.output
