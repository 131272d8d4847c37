"""The CUDA device under the TensorRT layer: buffers, streams, graph capture and timing, through torch.

TensorRT itself only ever sees integer addresses and stream handles; everything the engine runner
and the benchmark need from CUDA passes through one ``CudaDevice``, the one ``current()`` returns.
That is the seam the test suite uses to run the toolkit's TensorRT glue on machines without a GPU
(tests/trt_double swaps in host memory there); the toolkit itself has only this real device.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


class CudaDevice:
    """torch's current CUDA device."""

    #: What ``time`` measures with, for report labels.
    clock = "CUDA events"

    def unavailable_reason(self) -> str | None:
        """Why no CUDA GPU can be used here, or None."""
        import torch

        return None if torch.cuda.is_available() else "no CUDA GPU is visible (torch.cuda.is_available() is False)"

    def identity(self) -> tuple[str, str]:
        """The GPU's name and its compute capability (``8.9``)."""
        import torch

        major, minor = torch.cuda.get_device_capability()
        return torch.cuda.get_device_name(), f"{major}.{minor}"

    def upload(self, array: np.ndarray):
        """A device tensor holding ``array``."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def empty(self, shape: tuple[int, ...], dtype):
        """An uninitialized device tensor (torch's CUDA blocks are 512-byte aligned)."""
        import torch

        return torch.empty(shape, dtype=dtype, device="cuda")

    def new_stream(self):
        """A non-default stream."""
        import torch

        return torch.cuda.Stream()

    def handle(self, stream) -> int:
        """The ``cudaStream_t`` of ``stream`` as TensorRT takes it."""
        return stream.cuda_stream

    def follow_current(self, stream, tensor) -> None:
        """Order ``stream`` after torch's current stream, where ``tensor`` was made, and keep ``tensor``'s
        memory from being reused before ``stream`` has read it."""
        import torch

        stream.wait_stream(torch.cuda.current_stream())
        tensor.record_stream(stream)

    def on(self, stream):
        """Make ``stream`` torch's current stream inside the ``with`` block."""
        import torch

        return torch.cuda.stream(stream)

    def synchronize(self, stream) -> None:
        """Wait until ``stream`` has done all its work."""
        stream.synchronize()

    def capture(self, stream, enqueue: Callable[[], bool]):
        """Capture what ``enqueue`` queues on ``stream`` into a CUDA graph; None when it fails.

        The capture is begun on ``stream`` itself, thread-local, as trtexec does (sampleDevice.h,
        ``TrtCudaGraph::beginCapture``: ``cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal)``),
        and not through ``torch.cuda.graph``, whose ``__enter__`` synchronizes the whole device first
        and so would wait for every other stream's work, other models' included.
        """
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                queued = enqueue()
            finally:
                try:
                    graph.capture_end()
                except RuntimeError:  # the capture was invalidated
                    queued = False
        return graph if queued else None

    def replay(self, graph) -> None:
        """Queue a captured graph again (on the stream it was captured on)."""
        graph.replay()

    def time(self, call: Callable[[], object], stream=None) -> float:
        """Seconds of device time ``call`` queues on ``stream`` (torch's current one by default), from CUDA events.

        The events must sit on the stream the work runs on: events on another stream would measure
        whatever that stream did, or the host's wall time when the call blocks.
        """
        import torch

        stream = stream or torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        call()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3


_CUDA = CudaDevice()


def current() -> CudaDevice:
    """The device the TensorRT layer and the GPU benchmark rows run on."""
    return _CUDA

