"""Runners whose inputs live on the GPU: PyTorch at its best and ONNX Runtime's CUDA provider, timed as TensorRT is.

Each queues its work on a stream of its own with ``enqueue(device_tensor) -> device_tensor`` and returns without
waiting, so CUDA events recorded on ``stream`` time the device's work alone (as trtexec times an engine);
``infer_device`` waits for it, and ``infer(numpy) -> numpy`` serves the output check. The device is
``device.current()`` (torch CUDA; in tests a host device, whose clock is the wall clock).

- ``TorchDeviceRunner``: FP32 eager NCHW with PyTorch's default TF32 (convolutions), the baseline every GPU row
  divides by, or strict FP32 (TF32 off), the fidelity reference; FP16 and BF16 channels_last, one CUDA graph per
  batch shape; ``compiled``: ``torch.compile`` (inductor) first, its compile time measured per shape apart from the
  timed calls.
- ``OrtDeviceRunner``: an ONNX on ONNX Runtime's CUDA provider (NHWC kernels), input and output bound on the device
  (IO binding), queued on the provider's ``user_compute_stream`` without the end-of-run synchronization; with
  ``cuda_graph``, the provider's own CUDA graph over buffers bound once per batch shape.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time

import numpy as np

from ..runtime import device
from ..errors import OnnxError, first_line
from .runners import FirstCallTimer, compile_module

log = logging.getLogger(__name__)

#: Precisions a PyTorch row runs in, as torch dtype names.
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


#: ``allow_tf32=None``: PyTorch's own defaults, what a PyTorch user's FP32 runs with: cuDNN convolutions may use TF32
#: (``torch.backends.cudnn.allow_tf32`` is True), cuBLAS matmuls may not (``torch.backends.cuda.matmul.allow_tf32``
#: is False).
PYTORCH_DEFAULT_TF32 = (True, False)


@contextlib.contextmanager
def tf32(allow: bool | None):
    """Let FP32 convolutions and matmuls use TF32 (``allow``), or not, or as PyTorch does by default (None: convolutions
    only, ``PYTORCH_DEFAULT_TF32``), inside the ``with`` block.

    Through the ``allow_tf32`` flags of cuDNN and cuBLAS: torch's own code reads them (``torch.export`` does), and once
    the per-backend ``fp32_precision`` settings of torch >= 2.9 make cuDNN's convolutions and RNNs differ, that read
    raises.
    """
    import torch

    flags = [torch.backends.cudnn, torch.backends.cuda.matmul]
    before = [flag.allow_tf32 for flag in flags]
    for flag, value in zip(flags, PYTORCH_DEFAULT_TF32 if allow is None else (allow, allow)):
        flag.allow_tf32 = value
    try:
        yield
    finally:
        for flag, value in zip(flags, before):
            flag.allow_tf32 = value


def tf32_words(allow: bool | None) -> str:
    """A TF32 setting in a row's label."""
    return {None: "TF32 convolutions (PyTorch's default)", True: "TF32 on", False: "TF32 off (strict FP32)"}[allow]


class TorchDeviceRunner:
    """A PyTorch module on the device: FP32 eager NCHW, or FP16/BF16 channels_last replaying a CUDA graph per shape.

    ``compiled`` compiles the module with inductor (channels_last, any precision); ``compile_seconds[shape]``
    is the first call of each shape. ``cuda_graph`` (default: every precision but FP32) captures the forward
    once per input shape, after a forward that fills a private memory pool, so that the capture takes its
    memory from that pool and never from the driver (``CudaDevice.capture``); a failed capture warns once and
    the runner goes on without graphs. One runner may be called from several threads; a lock keeps each call
    whole. ``clone`` makes another runner on the same weights with a stream, graphs and pool of its own.
    ``allow_tf32`` (FP32): None for PyTorch's defaults (``tf32``), False for strict FP32, True for TF32 everywhere.
    """

    def __init__(self, module, precision: str = "fp32", *, compiled: bool = False, cuda_graph: bool | None = None,
                 allow_tf32: bool | None = None, _shared=None):
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
            parts.append(tf32_words(self.allow_tf32))
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


#: What ONNX Runtime's CUDA provider makes of a Q/DQ INT8 graph: it has no INT8 convolution kernels, so each
#: QuantizeLinear/DequantizeLinear pair runs around a float convolution (rows say so; TensorRT fuses them into INT8).
ORT_CUDA_INT8 = "INT8 Q/DQ emulated on the CUDA provider (float kernels, no INT8 convolutions)"


class OrtDeviceRunner:
    """An ONNX file on ONNX Runtime's CUDA provider with its input and output on the device (IO binding).

    The provider computes on this runner's stream (``user_compute_stream``, as onnxruntime#19229 added it to
    the Python API) with its NHWC kernels (``prefer_nhwc``, as PyTorch's rows run channels_last), and ``enqueue``
    returns without the end-of-run ``cudaStreamSynchronize`` (``disable_synchronize_execution_providers``,
    onnxruntime_run_options_config_keys.h), so CUDA events on ``stream`` time it as TensorRT's rows are timed.
    ``use_tf32`` (the provider allows TF32 by default) is ``allow_tf32``.

    ``cuda_graph``: the provider's own CUDA graph (``enable_cuda_graph``), which replays on the addresses it was
    captured with: one session per batch shape (its batch fixed by a free-dimension override), its input and output
    buffers made and bound once, the input copied into its buffer on each call. The provider captures on the third
    run of a shape (``min_num_runs_before_cuda_graph_capture_``, cuda_execution_provider.h; the session repeats the
    first run itself) in ``cudaStreamCaptureModeGlobal``, and synchronizes its stream after each replay
    (``CUDAGraphManager::Replay``, cuda_graph.cc), so this row's calls do not overlap: its figure includes that
    round trip. ``provider="CPUExecutionProvider"``
    binds host memory instead (the tests' host device), the same code but for the provider's options.
    """

    def __init__(self, path, *, allow_tf32: bool = False, provider: str = "CUDAExecutionProvider",
                 cuda_graph: bool = False):
        import onnxruntime as ort

        self.device = device.current()
        self.path, self.allow_tf32, self.provider, self.cuda_graph = path, allow_tf32, provider, cuda_graph
        self.stream = self.device.new_stream()
        self.session = self._session()
        self.input_name = self.session.get_inputs()[0].name
        self.batch_dim = self.session.get_inputs()[0].shape[0]
        output = self.session.get_outputs()[0]
        if not isinstance(output.shape[-1], int):
            raise OnnxError(f"{path}: output '{output.name}' has no fixed class dimension to bind")
        self.output_name, self.classes = output.name, output.shape[-1]
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.binding = self.session.io_binding()
        #: batch shape -> (session, binding, input buffer, output buffer), bound once (``cuda_graph``)
        self._bound: dict[tuple[int, ...], tuple] = {}
        self._lock = threading.Lock()
        self.name = f"ort-device:{getattr(path, 'name', path)}"

    def _session(self, batch: int | None = None):
        """A session of the file; with ``batch``, its batch axis fixed to it (a CUDA graph replays one shape)."""
        import onnxruntime as ort

        options = {}
        if self.provider == "CUDAExecutionProvider":
            options = {"user_compute_stream": str(self.device.handle(self.stream)),
                       "use_tf32": str(int(self.allow_tf32)), "prefer_nhwc": "1"}
            if batch is not None:
                options["enable_cuda_graph"] = "1"
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        if batch is not None and isinstance(self.batch_dim, str):
            session_options.add_free_dimension_override_by_name(self.batch_dim, batch)
        try:
            session = ort.InferenceSession(str(self.path), session_options, providers=[(self.provider, options)])
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise OnnxError(f"ONNX Runtime cannot load {self.path}"
                            f"{' with its CUDA graph' if batch is not None else ''}: {first_line(exc)}") from exc
        used = session.get_providers()
        if used[0] != self.provider:  # ONNX Runtime falls back to the CPU with only a log line
            raise OnnxError(f"ONNX Runtime could not use {self.provider} (it fell back to {', '.join(used)})")
        return session

    def settings(self) -> str:
        """What the timing label says of this runner."""
        graph = ", ONNX Runtime's CUDA graph (buffers bound once per batch)" if self.cuda_graph else ""
        return f"NHWC, IO binding{graph}, TF32 {'on' if self.allow_tf32 else 'off'}"

    def clone(self) -> OrtDeviceRunner:
        """Another session of the same file on a stream of its own."""
        return OrtDeviceRunner(self.path, allow_tf32=self.allow_tf32, provider=self.provider,
                               cuda_graph=self.cuda_graph)

    def enqueue(self, batch):
        """Queue a run of a device tensor on ``self.stream``; returns the output tensor without waiting."""
        import torch

        with self._lock:
            self.device.follow_current(self.stream, batch)
            with self.device.on(self.stream):
                x = batch.to(torch.float32).contiguous()
                if self.cuda_graph:
                    session, binding, static_in, static_out = self._bound_once(tuple(x.shape))
                    static_in.copy_(x)
                    session.run_with_iobinding(binding, self.run_options)
                    return static_out.clone()
                out = self.device.empty((x.shape[0], self.classes), torch.float32)
            self._bind(self.binding, x, out)
            self.session.run_with_iobinding(self.binding, self.run_options)
            return out

    def _bind(self, binding, x, out) -> None:
        kind = self.device.torch_device
        binding.bind_input(self.input_name, kind, 0, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, kind, 0, np.float32, tuple(out.shape), out.data_ptr())

    def _bound_once(self, shape: tuple[int, ...]) -> tuple:
        """The session, binding and buffers of ``shape``, made on the first call of that shape."""
        import torch

        if shape not in self._bound:
            session = self._session(shape[0])
            static_in = self.device.empty(shape, torch.float32)
            static_out = self.device.empty((shape[0], self.classes), torch.float32)
            binding = session.io_binding()
            self._bind(binding, static_in, static_out)
            self._bound[shape] = (session, binding, static_in, static_out)
        return self._bound[shape]

    def infer_device(self, batch):
        """Run a device tensor; returns the device output, complete."""
        out = self.enqueue(batch)
        self.device.synchronize(self.stream)
        return out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_device(self.device.upload(batch)).cpu().numpy()
