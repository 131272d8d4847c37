"""The CUDA seam under the TensorRT layer (resnet_export.runtime.device), on a real GPU: torch CUDA, no TensorRT needed.

Everything above this seam runs on the TensorRT double on any machine (tests/engine/test_trt_on_double.py); what
only a GPU can show is here, and skips with the reason where there is none.
"""

import numpy as np
import pytest
import torch

from resnet_export.runtime.device import CudaDevice

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def test_without_a_gpu_the_device_says_why():
    reason = CudaDevice().unavailable_reason()
    assert (reason is None) == torch.cuda.is_available()
    if reason:
        assert "no CUDA GPU" in reason


def _busy(stream, seconds: float = 2.0) -> None:
    """Queue about ``seconds`` of GPU time on ``stream`` (a spin kernel)."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(seconds * 1e9))


@pytest.mark.gpu
@needs_cuda
def test_a_capture_of_work_that_allocates_nothing_waits_for_no_other_stream():
    """The capture begins on the runner's stream (trtexec's way) and the captured work allocates nothing (its
    buffers exist before), as the TensorRT runner's capture of execute_async_v3 does: another stream's queued work
    is still running when the capture returns, and the allocator took nothing from the driver. With
    torch.cuda.graph (its __enter__ synchronizes the device) or an allocation inside the capture (a cudaMalloc
    waits for every stream; measured 3.03 s on an H200), the other stream is done and this fails."""
    device = CudaDevice()
    other, mine = torch.cuda.Stream(), device.new_stream()
    x = torch.ones(1024, device="cuda")
    y = torch.empty_like(x)
    torch.cuda.synchronize()
    reserved = device.reserved()
    _busy(other)
    graph = device.capture(mine, lambda: y.copy_(x).mul_(2) is not None)
    assert graph is not None and not other.query(), "the capture waited for the other stream"
    assert device.reserved() == reserved
    x.fill_(3)
    with device.on(mine):
        device.replay(graph)
    device.synchronize(mine)
    assert torch.equal(y, torch.full_like(x, 6))


@pytest.mark.gpu
@needs_cuda
def test_the_first_capture_in_a_process_takes_nothing_from_the_driver():
    """In a fresh process (so it is the first capture there): torch's first capture registers the CUDA generator's
    graph state, two tensors made on the capture stream (CUDAGeneratorImpl.cpp), unless the device made its first
    capture when it made the stream (``prime_captures``). Without that, reserved memory grows by a block here."""
    import subprocess
    import sys

    script = ("import torch; from resnet_export.runtime.device import CudaDevice; d = CudaDevice(); s = d.new_stream(); "
              "x = torch.ones(1024, device='cuda'); y = torch.empty_like(x); torch.cuda.synchronize(); "
              "r = d.reserved(); g = d.capture(s, lambda: y.copy_(x).mul_(2) is not None); "
              "print(g is not None, d.reserved() - r)")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.stdout.split() == ["True", "0"], child.stdout + child.stderr


@pytest.mark.gpu
@needs_cuda
def test_device_time_leaves_out_the_hosts_enqueue_time():
    """Each timed call spends half its GPU time on the host before it enqueues: with the queue kept full (one call
    queued before the first event) the intervals are the GPU's work alone; events recorded on an idle stream before
    each enqueue would add the host's half."""
    import time

    device = CudaDevice()
    stream = device.new_stream()
    with device.on(stream):
        gpu_seconds = min(device.time(lambda: torch.cuda._sleep(50_000_000), stream, calls=5))

        def call():
            time.sleep(gpu_seconds / 2)
            torch.cuda._sleep(50_000_000)

        seconds = device.time(call, stream, calls=5)
    assert max(seconds) < 1.2 * gpu_seconds, (seconds, gpu_seconds)


@pytest.mark.gpu
@needs_cuda
def test_a_capture_that_takes_memory_from_the_driver_says_so(caplog):
    """The rule's own alarm: work that allocates inside the capture (a new block of the graph's private pool) grows
    what the allocator holds from the driver, and the device warns that the capture waited for every stream."""
    device = CudaDevice()
    x = torch.ones(1 << 20, device="cuda")
    torch.cuda.synchronize()
    with caplog.at_level("WARNING", logger="resnet_export.runtime.device"):
        graph = device.capture(device.new_stream(), lambda: (x * 2) is not None)
    assert graph is not None and "took" in caplog.text and "waited for the work of every stream" in caplog.text


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_pytorch_graph_rows_capture_from_their_warm_pool_and_replay_what_eager_computes(precision, caplog):
    """TorchDeviceRunner runs the forward once in its private pool, then captures it drawing on that pool: the capture
    takes nothing from the driver (no warning), and replays on new inputs compute what eager PyTorch does."""
    import torchvision

    from resnet_export.runtime.device_runners import TorchDeviceRunner

    module = torchvision.models.resnet18(num_classes=10).eval()
    runner = TorchDeviceRunner(module, precision)
    eager = module.cuda().to(runner.dtype).to(memory_format=torch.channels_last)
    with caplog.at_level("WARNING", logger="resnet_export.runtime.device"):
        for seed in (0, 1, 2):  # capture at the first call, replays after
            x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).cuda()
            out = runner.infer_device(x)
            with torch.inference_mode():
                expected = eager(x.to(runner.dtype).contiguous(memory_format=torch.channels_last))
            torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)
    assert list(runner._graphs) == [(8, 3, 64, 64)] and runner.cuda_graph
    assert "from the driver" not in caplog.text


@pytest.mark.gpu
@needs_cuda
def test_fp32_rows_compute_in_fp32_unless_tf32_is_asked_for():
    """TF32 is off unless asked for: with it off the GPU's FP32 logits match the CPU's to FP32 rounding; with it on
    they differ more (TF32 keeps 10 mantissa bits)."""
    import torchvision

    from resnet_export.runtime.device_runners import TorchDeviceRunner

    module = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = module(x)
    errors = {}
    for allow in (False, True):
        out = TorchDeviceRunner(module, "fp32", allow_tf32=allow).infer(x.numpy())
        errors[allow] = float((torch.from_numpy(out) - reference).abs().max() / reference.abs().max())
    assert errors[False] < 1e-4 and errors[True] > errors[False], errors


@pytest.mark.gpu
@needs_cuda
def test_onnx_runtime_on_the_device_queues_on_its_stream_and_computes_what_the_cpu_does(resnet18_onnx):
    """ort-cuda with IO binding: the provider computes on the runner's stream (user_compute_stream), the output
    lands in the device buffer bound to it."""
    import onnxruntime as ort

    from resnet_export.runtime.device_runners import OrtDeviceRunner
    from resnet_export.runtime.runners import OrtRunner

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("ONNX Runtime has no CUDAExecutionProvider here (onnxruntime-gpu is not installed)")
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)).numpy()
    runner = OrtDeviceRunner(resnet18_onnx.path)
    assert runner.session.get_provider_options()["CUDAExecutionProvider"]["user_compute_stream"] == str(
        runner.stream.cuda_stream)
    np.testing.assert_allclose(runner.infer(x), OrtRunner(resnet18_onnx.path).infer(x), atol=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_a_failed_capture_is_none():
    device = CudaDevice()
    assert device.capture(device.new_stream(), lambda: False) is None


@pytest.mark.gpu
@needs_cuda
def test_time_counts_the_work_queued_on_the_stream_and_follow_current_orders_it():
    device = CudaDevice()
    stream = device.new_stream()
    seconds = device.time(lambda: torch.cuda._sleep(200_000_000), stream=None, calls=3)
    assert len(seconds) == 3 and min(seconds) > 0.01  # device time of the sleep, not the host's microseconds to queue it
    made = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(500_000_000)  # on the current stream, before `made` is ready for others
    made.fill_(1)
    device.follow_current(stream, made)
    with device.on(stream):
        total = made.sum()
    device.synchronize(stream)
    assert total.item() == made.numel()
