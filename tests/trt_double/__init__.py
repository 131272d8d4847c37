"""The TensorRT double and the host device it runs on, for tests only (never importable from resnet_export).

``install`` puts ``tests/trt_double/tensorrt.py`` in ``sys.modules`` as ``tensorrt`` and makes a
``HostDevice`` the toolkit's current device (``resnet_export.device.current``), so the toolkit's TensorRT
layer runs end to end on the CPU: buffers are 256-byte aligned host tensors whose addresses the double's
contexts read and write, streams are host streams whose handles it looks up, and a capture records the
runs enqueued on the capturing stream for replay.

Streams keep CUDA's ordering where the toolkit can get it wrong. Work the double enqueues on a stream
(``execute_async_v3``) is queued and runs when the stream is synchronized (or timed, or captured), not
before; an upload is queued on the current stream and lands when a stream is ordered after it
(``follow_current``) or the current stream is synchronized. So a missing ``synchronize`` reads a stale
output and a missing ``follow_current`` feeds the engine an input not yet written, as on a GPU. PyTorch's
own host operations run at once, as if on the stream they were issued on. Each buffer remembers the stream
it was made on (the current one: ``on`` sets it), and each stream the streams it waited for and when: the
double refuses to run on a buffer its stream neither made nor waited for after it was made (a race on a GPU),
so a missing ``on`` fails too. The CUDA device's versions of these run only on a GPU (tests/runtime/test_device.py).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from typing import Callable

import numpy as np
import torch

from . import tensorrt as double

#: The name every manifest and report made on the double carries as its GPU.
HOST_GPU = "TensorRT double (host memory, ONNX Runtime; no GPU)"


#: The alignment TensorRT asks of tensor addresses and of an execution context's device memory
#: (NvInferRuntime.h, IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment").
ALIGNMENT = 256


class HostStream:
    """A stream of the host device: a handle TensorRT is given, the work queued on it and not yet run, and the runs
    it records while capturing."""

    _handles = itertools.count(0x1000)
    _streams: dict[int, HostStream] = {}

    def __init__(self):
        self.handle = next(self._handles)
        self.capturing: list[Callable[[], None]] | None = None
        self.queued: list[Callable[[], None]] = []
        #: tensors this stream's queued work may still read (CUDA's ``record_stream``): alive until it has run
        self.recorded: list = []
        #: stream -> the moment (``HostDevice.clock``) this stream last waited for it
        self.waited: dict[HostStream, int] = {}
        self._streams[self.handle] = self

    @classmethod
    def find(cls, handle: int) -> HostStream | None:
        return cls._streams.get(handle)

    def enqueue(self, job: Callable[[], None]) -> None:
        """Record ``job`` into the graph being captured, else queue it to run when the stream is synchronized."""
        (self.capturing if self.capturing is not None else self.queued).append(job)

    def run_queued(self) -> None:
        """Run what is queued, in order (what reaching this point of the stream means)."""
        while self.queued:
            self.queued.pop(0)()
        self.recorded.clear()

    @classmethod
    def all_idle(cls) -> bool:
        """Whether no stream has work queued."""
        return not any(stream.queued for stream in cls._streams.values())


class HostDevice:
    """``resnet_export.device.CudaDevice``'s interface on host memory, for the TensorRT double."""

    clock = "host wall clock (TensorRT double, not a GPU figure)"
    TIMING = "the host's wall clock around each call and the work it queued (TensorRT double, not a GPU figure)"
    torch_device = "cpu"

    def __init__(self, name: str = HOST_GPU, compute_capability: str = "8.9"):
        self.name, self.compute_capability = name, compute_capability
        self.default_stream = HostStream()  # what torch's current stream is outside ``on``
        self._local = threading.local()  # the current stream is per thread, as torch's is
        #: Every buffer made since no stream had work queued: a queued run may still read or write it by address, so
        #: it lives until then (on a GPU the caching allocator orders such reuse on the stream instead).
        self._held: list[torch.Tensor] = []
        #: (start, end, stream it was made on, moment) of each buffer this device made
        self._made: list[tuple[int, int, HostStream, int]] = []
        self._moments = itertools.count()

    def unavailable_reason(self) -> str | None:
        return None

    def identity(self) -> tuple[str, str]:
        return self.name, self.compute_capability

    def upload(self, array: np.ndarray):
        """A host tensor that receives ``array`` when the current stream's queued work runs (a host-to-device copy
        queued on it)."""
        array = np.array(array, copy=True)
        tensor = self.empty(array.shape, getattr(torch, str(array.dtype)))
        self.current.enqueue(lambda: tensor.copy_(torch.from_numpy(array)))
        return tensor

    def empty(self, shape, dtype):
        """An uninitialized host tensor at a 256-byte aligned address, as cudaMalloc's blocks are."""
        count = int(np.prod(shape)) if len(shape) else 1
        size = count * torch.empty((), dtype=dtype).element_size()
        raw = torch.empty(size + ALIGNMENT, dtype=torch.uint8)
        self._held.append(raw)
        self._made.append((raw.data_ptr(), raw.data_ptr() + raw.numel(), self.current, next(self._moments)))
        offset = -raw.data_ptr() % ALIGNMENT
        return raw[offset:offset + size].view(dtype).view(tuple(shape))

    def race(self, stream: HostStream, address: int) -> str | None:
        """Why work on ``stream`` may not touch the buffer at ``address``: it was made on another stream that
        ``stream`` has not waited for since (a race on a GPU); None when it may, or the buffer is not this device's."""
        for start, end, made_on, moment in reversed(self._made):
            if start <= address < end:
                if made_on is stream or stream.waited.get(made_on, -1) > moment:
                    return None
                return (f"the buffer at {address:#x} was made on stream {made_on.handle:#x}, which stream "
                        f"{stream.handle:#x} has not waited for since")
        return None

    def _ran(self) -> None:
        """Release the buffers held for queued work once no stream has any."""
        if HostStream.all_idle():
            self._held.clear()
            self._made.clear()

    def new_stream(self) -> HostStream:
        return HostStream()

    def handle(self, stream: HostStream) -> int:
        return stream.handle

    def follow_current(self, stream, tensor) -> None:
        """``stream`` waits for the current stream: what is queued there lands now, before anything after; and
        ``tensor`` lives until ``stream``'s work has run (``record_stream``)."""
        self.current.run_queued()
        stream.waited[self.current] = next(self._moments)
        stream.recorded.append(tensor)

    @property
    def current(self) -> HostStream:
        """This thread's current stream."""
        return getattr(self._local, "stream", self.default_stream)

    @contextlib.contextmanager
    def on(self, stream):
        """Make ``stream`` this thread's current one inside the block: buffers made there belong to it."""
        previous, self._local.stream = self.current, stream
        try:
            yield
        finally:
            self._local.stream = previous

    def synchronize(self, stream) -> None:
        stream.run_queued()
        self._ran()

    def reserved(self) -> int:
        return 0  # host memory has no driver reservation to grow

    def memory_pool(self):
        return None

    def allocating_in(self, pool):
        return contextlib.nullcontext()

    def capture(self, stream: HostStream, enqueue: Callable[[], bool], pool=None):
        """The runs the double queued on ``stream`` while ``enqueue`` ran; for work that queues nothing on a host
        stream (PyTorch on the host), the call itself, which a replay makes again on the same buffers. What was
        queued before comes first, as on a GPU: it runs before the capture begins."""
        stream.run_queued()
        stream.capturing = []
        try:
            queued = enqueue()
        finally:
            graph, stream.capturing = stream.capturing, None
        return (graph or [enqueue]) if queued else None

    def replay(self, graph: list[Callable[[], None]]) -> None:
        for run in graph:
            run()

    def time(self, call: Callable[[], object], stream=None, calls: int = 1) -> list[float]:
        """Wall seconds of each of ``calls`` calls and of the work each queued on ``stream`` (run before its clock
        stops)."""
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            (stream or self.default_stream).run_queued()
            seconds.append(time.perf_counter() - start)
            self._ran()
        return seconds


def install(monkeypatch, version: str | None = None, device: HostDevice | None = None) -> HostDevice:
    """Make the double ``tensorrt`` (at ``version``, default its own) and ``device`` (default a HostDevice)
    what the toolkit uses, until ``monkeypatch`` undoes it."""
    from resnet_export.runtime import device as devices
    from resnet_export.engine import tensorrt as trt

    device = device or HostDevice()
    monkeypatch.setitem(sys.modules, "tensorrt", double)
    monkeypatch.setattr(double, "__version__", version or double.__version__)
    monkeypatch.setattr(devices, "current", lambda: device)
    trt.logger.cache_clear()  # a logger of another tensorrt module must not be reused
    return device
