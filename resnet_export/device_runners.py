"""Runners whose inputs live on the GPU: PyTorch at its best and ONNX Runtime's CUDA provider, timed as TensorRT is.

Each queues its work on a stream of its own with ``enqueue(device_tensor) -> device_tensor`` and returns without
waiting, so CUDA events recorded on ``stream`` time the device's work alone (as trtexec times an engine);
``infer_device`` waits for it, and ``infer(numpy) -> numpy`` serves the output check. The device is
``device.current()`` (torch CUDA; in tests a host device, whose clock is the wall clock).

- ``TorchDeviceRunner``: FP32 eager NCHW, the baseline every GPU row divides by; FP16 and BF16 channels_last,
  one CUDA graph per batch shape; ``compiled``: ``torch.compile`` (inductor) first, its compile time measured
  per shape apart from the timed calls. TF32 is off unless asked for.
- ``OrtDeviceRunner``: an ONNX on ONNX Runtime's CUDA provider, input and output bound on the device (IO
  binding), queued on the provider's ``user_compute_stream`` without the end-of-run synchronization.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time

import numpy as np

from . import device
from .errors import OnnxError, first_line
from .runners import FirstCallTimer, compile_module

log = logging.getLogger(__name__)

#: Precisions a PyTorch row runs in, as torch dtype names.
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@contextlib.contextmanager
def tf32(allow: bool):
    """Let FP32 convolutions and matmuls use TF32 (``allow``) or not, inside the ``with`` block.

    Through the ``allow_tf32`` flags of cuDNN and cuBLAS (cuDNN allows TF32 by default, cuBLAS does not): torch's
    own code reads them (``torch.export`` does), and once the per-backend ``fp32_precision`` settings of torch >= 2.9
    make cuDNN's convolutions and RNNs differ, that read raises.
    """
    import torch

    flags = [torch.backends.cudnn, torch.backends.cuda.matmul]
    before = [flag.allow_tf32 for flag in flags]
    for flag in flags:
        flag.allow_tf32 = allow
    try:
        yield
    finally:
        for flag, value in zip(flags, before):
            flag.allow_tf32 = value


class TorchDeviceRunner:
    """A PyTorch module on the device: FP32 eager NCHW, or FP16/BF16 channels_last replaying a CUDA graph per shape.

    ``compiled`` compiles the module with inductor (channels_last, any precision); ``compile_seconds[shape]``
    is the first call of each shape. ``cuda_graph`` (default: every precision but FP32) captures the forward
    once per input shape, after a forward that fills a private memory pool, so that the capture takes its
    memory from that pool and never from the driver (``CudaDevice.capture``); a failed capture warns once and
    the runner goes on without graphs. One runner may be called from several threads; a lock keeps each call
    whole. ``clone`` makes another runner on the same weights with a stream, graphs and pool of its own.
    """

    def __init__(self, module, precision: str = "fp32", *, compiled: bool = False, cuda_graph: bool | None = None,
                 allow_tf32: bool = False, _shared=None):
        import torch

        self.device = device.current()
        self.precision, self.allow_tf32, self.compiled = precision, allow_tf32, compiled
        self.dtype = getattr(torch, TORCH_DTYPES[precision])
        self.channels_last = precision != "fp32" or compiled
        self.layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.cuda_graph = precision != "fp32" if cuda_graph is None else cuda_graph
        if _shared is None:
            module = copy.deepcopy(module).eval().to(self.device.torch_device, self.dtype, memory_format=self.layout)
            _shared = (module, compile_module(module) if compiled else module, FirstCallTimer())
        self._module, self.module, self.first_calls = _shared
        self.stream = self.device.new_stream()
        self._pool = self.device.memory_pool() if self.cuda_graph else None
        self._graphs: dict[tuple[int, ...], tuple] = {}
        self._lock = threading.Lock()
        self.name = f"torch-{'compile' if compiled else 'device'}-{precision}"

    @property
    def compile_seconds(self) -> dict[tuple[int, ...], float]:
        """Seconds of the first call per input shape of a compiled module (compile and one run); empty otherwise."""
        return self.first_calls.seconds if self.compiled else {}

    def settings(self) -> str:
        """What the timing label says of this runner: layout, graphs, TF32."""
        parts = ["channels_last" if self.channels_last else "NCHW"]
        if self.compiled:
            parts.insert(0, "torch.compile (inductor)")
        if self.cuda_graph:
            parts.append("CUDA graph")
        if self.precision == "fp32":
            parts.append("TF32 " + ("on" if self.allow_tf32 else "off"))
        return ", ".join(parts)

    def clone(self) -> TorchDeviceRunner:
        """Another runner on the same (compiled) module, with its own stream, graphs and memory pool."""
        return TorchDeviceRunner(None, self.precision, compiled=self.compiled, cuda_graph=self.cuda_graph,
                                 allow_tf32=self.allow_tf32, _shared=(self._module, self.module, self.first_calls))

    def _forward(self, x):
        import torch

        with torch.inference_mode(), tf32(self.allow_tf32):
            return self.module(x)

    def enqueue(self, batch):
        """Queue the forward pass of a device tensor on ``self.stream``; returns its output without waiting."""
        shape = tuple(batch.shape)
        with self._lock:
            self.device.follow_current(self.stream, batch)
            with self.device.on(self.stream):
                x = batch.to(self.dtype).contiguous(memory_format=self.layout)
                if self.cuda_graph and shape not in self._graphs:
                    return self._capture(x, shape)
                if self.cuda_graph:
                    graph, static_in, static_out = self._graphs[shape]
                    static_in.copy_(x)
                    self.device.replay(graph)
                    return static_out.clone()
                return self.first_calls.run(shape, lambda: self._forward(x), self._wait)

    def _wait(self) -> None:
        self.device.synchronize(self.stream)

    def _capture(self, x, shape: tuple[int, ...]):
        """Run once allocating in the pool, then capture the forward for ``shape`` into a graph drawing on it."""
        static_in = x.clone()
        with self.device.allocating_in(self._pool):
            out = self.first_calls.run(shape, lambda: self._forward(static_in), self._wait)
            self._wait()  # the pool's blocks are free for the capture once this run is done
        static_out = out.clone()
        del out
        try:
            graph = self.device.capture(self.stream, lambda: static_out.copy_(self._forward(static_in)) is not None,
                                        pool=self._pool)
        except RuntimeError as exc:
            log.warning(f"CUDA graph capture of {self.name} failed ({first_line(exc)}): running without CUDA graphs")
            graph = None
        if graph is None:
            self.cuda_graph = False
        else:
            self._graphs[shape] = (graph, static_in, static_out)
        return static_out.clone()

    def infer_device(self, batch):
        """Run a device tensor; returns the device output, complete."""
        out = self.enqueue(batch)
        self._wait()
        return out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_device(self.device.upload(batch)).float().cpu().numpy()


class OrtDeviceRunner:
    """An ONNX file on ONNX Runtime's CUDA provider with its input and output on the device (IO binding).

    The provider computes on this runner's stream (``user_compute_stream``, as onnxruntime#19229 added it to
    the Python API) and ``enqueue`` returns without the end-of-run ``cudaStreamSynchronize``
    (``disable_synchronize_execution_providers``, onnxruntime_run_options_config_keys.h), so CUDA events on
    ``stream`` time it as TensorRT's rows are timed. ``use_tf32`` (the provider allows TF32 by default) is
    ``allow_tf32``. ``provider="CPUExecutionProvider"`` binds host memory instead (the tests' host device).
    """

    def __init__(self, path, *, allow_tf32: bool = False, provider: str = "CUDAExecutionProvider"):
        import onnxruntime as ort

        self.device = device.current()
        self.path, self.allow_tf32, self.provider = path, allow_tf32, provider
        self.stream = self.device.new_stream()
        options = {}
        if provider == "CUDAExecutionProvider":
            options = {"user_compute_stream": str(self.device.handle(self.stream)), "use_tf32": str(int(allow_tf32))}
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=[(provider, options)])
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise OnnxError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from exc
        used = self.session.get_providers()
        if used[0] != provider:  # ONNX Runtime falls back to the CPU with only a log line
            raise OnnxError(f"ONNX Runtime could not use {provider} (it fell back to {', '.join(used)})")
        self.input_name = self.session.get_inputs()[0].name
        output = self.session.get_outputs()[0]
        if not isinstance(output.shape[-1], int):
            raise OnnxError(f"{path}: output '{output.name}' has no fixed class dimension to bind")
        self.output_name, self.classes = output.name, output.shape[-1]
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.binding = self.session.io_binding()
        self._lock = threading.Lock()
        self.name = f"ort-device:{getattr(path, 'name', path)}"

    def settings(self) -> str:
        """What the timing label says of this runner."""
        return f"IO binding, TF32 {'on' if self.allow_tf32 else 'off'}"

    def clone(self) -> OrtDeviceRunner:
        """Another session of the same file on a stream of its own."""
        return OrtDeviceRunner(self.path, allow_tf32=self.allow_tf32, provider=self.provider)

    def enqueue(self, batch):
        """Queue a run of a device tensor on ``self.stream``; returns the output tensor without waiting."""
        import torch

        kind = self.device.torch_device
        with self._lock:
            self.device.follow_current(self.stream, batch)
            with self.device.on(self.stream):
                x = batch.to(torch.float32).contiguous()
                out = self.device.empty((x.shape[0], self.classes), torch.float32)
            self.binding.bind_input(self.input_name, kind, 0, np.float32, tuple(x.shape), x.data_ptr())
            self.binding.bind_output(self.output_name, kind, 0, np.float32, tuple(out.shape), out.data_ptr())
            self.session.run_with_iobinding(self.binding, self.run_options)
            return out

    def infer_device(self, batch):
        """Run a device tensor; returns the device output, complete."""
        out = self.enqueue(batch)
        self.device.synchronize(self.stream)
        return out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_device(self.device.upload(batch)).cpu().numpy()
