"""The TensorRT double and the host device it runs on, for tests only (never importable from resnet_export).

``install`` puts ``tests/trt_double/tensorrt.py`` in ``sys.modules`` as ``tensorrt`` and makes a
``HostDevice`` the toolkit's current device (``resnet_export.device.current``), so the toolkit's TensorRT
layer runs end to end on the CPU: buffers are host tensors whose addresses the double's contexts read
and write, streams are host streams whose handles it looks up, and a capture records the runs
enqueued on the capturing stream for replay. Nothing runs asynchronously, so ordering a stream after
another and synchronizing are no-ops; the CUDA device's own versions of these run only on a GPU
(tests/test_device.py).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from typing import Callable

import numpy as np
import torch

from . import tensorrt as double

#: The name every manifest and report made on the double carries as its GPU.
HOST_GPU = "TensorRT double (host memory, ONNX Runtime; no GPU)"


class HostStream:
    """A stream of the host device: a handle TensorRT is given, and the runs it records while capturing."""

    _handles = itertools.count(0x1000)
    _streams: dict[int, HostStream] = {}

    def __init__(self):
        self.handle = next(self._handles)
        self.capturing: list[Callable[[], None]] | None = None
        self._streams[self.handle] = self

    @classmethod
    def find(cls, handle: int) -> HostStream | None:
        return cls._streams.get(handle)


class HostDevice:
    """``resnet_export.device.CudaDevice``'s interface on host memory, for the TensorRT double."""

    clock = "host wall clock (TensorRT double, not a GPU figure)"
    torch_device = "cpu"

    def __init__(self, name: str = HOST_GPU, compute_capability: str = "8.9"):
        self.name, self.compute_capability = name, compute_capability

    def unavailable_reason(self) -> str | None:
        return None

    def identity(self) -> tuple[str, str]:
        return self.name, self.compute_capability

    def upload(self, array: np.ndarray):
        return torch.tensor(np.ascontiguousarray(array))  # a copy in torch's own (aligned) memory

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def new_stream(self) -> HostStream:
        return HostStream()

    def handle(self, stream: HostStream) -> int:
        return stream.handle

    def follow_current(self, stream, tensor) -> None:
        pass  # every host run is complete when its enqueue returns

    def on(self, stream):
        return contextlib.nullcontext()

    def synchronize(self, stream) -> None:
        pass

    def reserved(self) -> int:
        return 0  # host memory has no driver reservation to grow

    def memory_pool(self):
        return None

    def allocating_in(self, pool):
        return contextlib.nullcontext()

    def capture(self, stream: HostStream, enqueue: Callable[[], bool], pool=None):
        """The runs the double queued on ``stream`` while ``enqueue`` ran; for work that queues nothing on a host
        stream (PyTorch on the host), the call itself, which a replay makes again on the same buffers."""
        stream.capturing = []
        try:
            queued = enqueue()
        finally:
            graph, stream.capturing = stream.capturing, None
        return (graph or [enqueue]) if queued else None

    def replay(self, graph: list[Callable[[], None]]) -> None:
        for run in graph:
            run()

    def time(self, call: Callable[[], object], stream=None) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start


def install(monkeypatch, version: str | None = None, device: HostDevice | None = None) -> HostDevice:
    """Make the double ``tensorrt`` (at ``version``, default its own) and ``device`` (default a HostDevice)
    what the toolkit uses, until ``monkeypatch`` undoes it."""
    from resnet_export import device as devices
    from resnet_export import trt

    device = device or HostDevice()
    monkeypatch.setitem(sys.modules, "tensorrt", double)
    monkeypatch.setattr(double, "__version__", version or double.__version__)
    monkeypatch.setattr(devices, "current", lambda: device)
    trt.logger.cache_clear()  # a logger of another tensorrt module must not be reused
    return device
