"""The CUDA seam under the TensorRT layer (resnet_export.device), on a real GPU: torch CUDA, no TensorRT needed.

Everything above this seam runs on the TensorRT double on any machine (tests/test_trt_on_double.py); what
only a GPU can show is here, and skips with the reason where there is none.
"""

import pytest
import torch

from resnet_export.device import CudaDevice

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def test_without_a_gpu_the_device_says_why():
    reason = CudaDevice().unavailable_reason()
    assert (reason is None) == torch.cuda.is_available()
    if reason:
        assert "no CUDA GPU" in reason


@pytest.mark.gpu
@needs_cuda
def test_capture_does_not_wait_for_other_streams():
    """The capture begins on the runner's stream (trtexec's way), not through torch.cuda.graph, whose
    __enter__ synchronizes the whole device: another stream's queued work is still running afterwards."""
    device = CudaDevice()
    other, mine = torch.cuda.Stream(), device.new_stream()
    x = torch.ones(1024, device="cuda")
    y = torch.empty_like(x)
    with torch.cuda.stream(other):
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time on another stream
    graph = device.capture(mine, lambda: bool(y.copy_(x * 2).data_ptr()))
    assert graph is not None and not other.query()
    x.fill_(3)
    with device.on(mine):
        device.replay(graph)
    device.synchronize(mine)
    assert torch.equal(y, torch.full_like(x, 6))


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
    seconds = device.time(lambda: torch.cuda._sleep(200_000_000), stream=None)
    assert seconds > 0.01  # device time of the sleep, not the host's microseconds to queue it
    made = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(500_000_000)  # on the current stream, before `made` is ready for others
    made.fill_(1)
    device.follow_current(stream, made)
    with device.on(stream):
        total = made.sum()
    device.synchronize(stream)
    assert total.item() == made.numel()
