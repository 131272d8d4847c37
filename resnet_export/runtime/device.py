"""The CUDA device under the TensorRT layer: buffers, streams, graph capture and timing, through torch.

TensorRT itself only ever sees integer addresses and stream handles; everything the engine runner
and the benchmark need from CUDA passes through one ``CudaDevice``, the one ``current()`` returns.
That is the seam the test suite uses to run the toolkit's TensorRT glue on machines without a GPU
(tests/trt_double swaps in host memory there); the toolkit itself has only this real device.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class CudaDevice:
    """torch's current CUDA device."""

    #: What ``time`` measures with, for report labels.
    clock = "CUDA events"
    #: How ``time`` measures, for reports.
    TIMING = ("CUDA events between back-to-back calls on the row's stream, one untimed call queued first, so the host "
              "enqueues each call while the GPU runs the one before (the host's enqueue time is not counted)")
    #: Where torch puts tensors and modules for this device.
    torch_device = "cuda"

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

    def __init__(self):
        #: per GPU index, a graph kept alive so that torch's CUDA generator state stays registered (``new_stream``)
        self._graph_state: dict[int, tuple] = {}

    def new_stream(self):
        """A non-default stream, on a GPU whose first capture in this process has been made (``prime_captures``)."""
        import torch

        self.prime_captures()
        return torch.cuda.Stream()

    def prime_captures(self) -> None:
        """Make the first CUDA-graph capture of this process on the current GPU, of nothing that allocates, and keep it.

        ``CUDAGraph::capture_begin`` registers the graph with the default CUDA generator, whose first registration
        allocates its graph state (two int64 tensors, ``at::empty`` on the capture stream) and whose last
        unregistration frees it (aten/src/ATen/cuda/CUDAGeneratorImpl.cpp, ``CUDAGeneratorState::register_graph`` /
        ``unregister_graph``). So the first capture in a process took a block from the driver on its stream, a
        ``cudaMalloc`` among other streams' work, and every capture after the last graph was freed did again.
        A graph held here for the process's life keeps that state registered: every later capture allocates
        only what its own work does. Done when the device makes a stream, before any capture can be asked for.
        """
        import torch

        index = torch.cuda.current_device()
        if index not in self._graph_state:
            self._graph_state[index] = self._trivial_capture()

    @staticmethod
    def _trivial_capture() -> tuple:
        """A graph of one in-place kernel captured on a stream of its own, and its buffer; outside inference mode, so
        that on torch < 2.11 the generator state registered here is no inference tensor a later capture cannot
        update (pytorch#166792)."""
        import torch

        with torch.inference_mode(False):
            scratch = torch.zeros(1, device="cuda")
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with _CAPTURING, torch.cuda.stream(stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    scratch.add_(1)  # a node, so the graph is not empty (capture_end warns of an empty one)
                finally:
                    graph.capture_end()
            stream.synchronize()
        return graph, scratch

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

    def reserved(self) -> int:
        """Bytes of device memory torch's allocator holds from the driver: it grows only by a ``cudaMalloc``."""
        import torch

        return torch.cuda.memory_reserved()

    def memory_pool(self):
        """A private pool of torch's allocator: work run inside ``allocating_in(pool)`` leaves its freed blocks
        there, and a capture given the same pool takes its memory from them instead of from the driver."""
        import torch

        return torch.cuda.MemPool()

    def allocating_in(self, pool):
        """Make torch allocate from ``pool`` (``memory_pool``) inside the ``with`` block; nothing when it is None."""
        import torch

        return contextlib.nullcontext() if pool is None else torch.cuda.use_mem_pool(pool)

    def capture(self, stream, enqueue: Callable[[], bool], pool=None):
        """Capture what ``enqueue`` queues on ``stream`` into a CUDA graph; None when it fails.

        The capture is begun on ``stream`` itself, thread-local, as trtexec does (sampleDevice.h,
        ``TrtCudaGraph::beginCapture``: ``cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal)``),
        and not through ``torch.cuda.graph``, whose ``__enter__`` synchronizes the whole device first
        and so would wait for every other stream's work, other models' included.

        The captured work must allocate nothing: a ``cudaMalloc`` issued between work on two streams keeps
        them from running concurrently (CUDA C++ Programming Guide, "Implicit Synchronization"); measured on
        an H200, the first capture that allocated blocked for the 3 s another stream was busy. So buffers
        (and TensorRT's activation block) are made before the capture, and work that must allocate (a
        PyTorch forward) runs once inside ``allocating_in(pool)`` first and is captured with that ``pool``.
        A capture that still took memory from the driver is reported (``reserved`` grew).
        """
        import torch

        graph = torch.cuda.CUDAGraph()
        before = self.reserved()
        with _CAPTURING, torch.cuda.stream(stream):
            graph.capture_begin(pool=None if pool is None else pool.id, capture_error_mode="thread_local")
            try:
                queued = enqueue()
            finally:
                try:
                    graph.capture_end()
                except RuntimeError:  # the capture was invalidated
                    queued = False
                    failed = True
                else:
                    failed = False
        if failed:
            self._after_failed_capture(graph)
        grown = self.reserved() - before
        if grown > 0:
            log.warning(f"a CUDA graph capture took {grown / 2**20:.1f} MiB from the driver: that cudaMalloc waited "
                        "for the work of every stream on the GPU")
        return graph if queued else None

    def _after_failed_capture(self, graph) -> None:
        """What ``CUDAGraph::capture_end`` leaves undone when ``cudaStreamEndCapture`` throws (CUDAGraph.cpp: the
        check comes before ``endAllocateToPool`` and the generator's ``capture_epilogue``): the allocator is given
        back its routing to the graph's pool, and a capture that completes clears the CUDA generator's capturing
        flag, else every later eager RNG call on the GPU fails."""
        import torch

        end = getattr(torch._C, "_cuda_endAllocateToPool", None)  # what torch.cuda.use_mem_pool calls on exit
        if end is not None:
            end(torch.cuda.current_device(), graph.pool())
        self._trivial_capture()

    def replay(self, graph) -> None:
        """Queue a captured graph again (on the stream it was captured on)."""
        graph.replay()

    def time(self, call: Callable[[], object], stream=None, calls: int = 1) -> list[float]:
        """Seconds of device time of each of ``calls`` back-to-back calls of ``call`` on ``stream`` (torch's current
        one by default), from CUDA events, with the queue kept full (``TIMING``).

        One untimed call is queued first, and an event after it and after each timed call: each timed call is
        enqueued by the host while the GPU still runs the one before, so an interval between two events is the
        GPU's work on one call, not the host's enqueue (an event recorded on an idle stream before an enqueue
        counts the host's enqueue time: 3-6% at batch 1 with a CUDA graph). Where the host enqueues slower than the
        GPU computes, the GPU waits between calls and the intervals say so: that is the rate the row can reach.
        The events sit on the stream the work runs on: events on another stream would measure whatever that stream
        did, or the host's wall time when the call blocks.
        """
        import torch

        stream = stream or torch.cuda.current_stream()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
        call()  # fills the queue: the first event fires when the GPU is done with it
        for index, event in enumerate(events):
            event.record(stream)
            if index < calls:
                call()
        events[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


#: One CUDA-graph capture at a time in the process (torch/cuda/graphs.py: "only one capture may be underway at a time
#: in the process"; the generator's set of registered graphs is unguarded and capture_begin releases the GIL), though
#: runners on several streams and threads capture their first call at once.
_CAPTURING = threading.Lock()

_CUDA = CudaDevice()


def libcuda():
    """The CUDA driver library (libcuda.so.1) through ctypes, or None where there is no driver."""
    import ctypes

    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def cuda_gpus() -> int:
    """How many CUDA GPUs the driver sees (``cuDeviceGetCount``, which honours ``CUDA_VISIBLE_DEVICES`` as torch does),
    without importing torch: what an ONNX Runtime or OpenVINO process asks before choosing its provider."""
    import ctypes

    driver, count = libcuda(), ctypes.c_int()
    if driver is None or driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:  # CUDA_SUCCESS
        return 0
    return count.value


def current() -> CudaDevice:
    """The device the TensorRT layer and the GPU benchmark rows run on."""
    return _CUDA

