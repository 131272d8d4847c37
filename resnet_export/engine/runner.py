"""Running a plan: the engine runner, its buffers, streams and CUDA graphs (the CUDA seam: ``runtime.device``)."""

from __future__ import annotations
import logging
import platform
import re
import threading
import time
from pathlib import Path
import numpy as np
from ..runtime import device
from ..manifest import manifest_path
from .tensorrt import EngineError, gpu_caveat, incompatibility, load_manifest, logger, require_tensorrt, runtime_info, torch_dtype_name

log = logging.getLogger(__name__)


class TrtRunner:
    """A TensorRT plan as a Runner: numpy in, numpy out, device tensors (``device.current()``) as buffers.

    The manifest (``manifest``, else the plan's sidecar) is checked against this machine before
    deserializing, so a plan from another TensorRT version, GPU or platform fails with a clear message.
    Every execution context of the runner draws on one activation block (``scratch``): they all run in
    order on the runner's stream. ``cuda_graph=True`` captures the enqueue once per input shape, each
    in its own context with its own input and output buffers, and replays it.

    One runner may be called from several threads: a lock keeps each call's shape, addresses and
    enqueue together, since they share the context, its graphs and the activation block; calls run
    one after another on the runner's stream. For parallel inference, use one runner per thread.
    """

    def __init__(self, plan: str | Path, cuda_graph: bool = False, manifest: dict | None = None):
        require_tensorrt(f"run {plan}")
        import tensorrt as trt
        import torch

        plan = Path(plan)
        manifest = manifest or load_manifest(plan)
        self.plan, self.manifest = plan, manifest
        self.device = device.current()
        self.runtime = trt.Runtime(logger())
        if manifest is None:
            log.warning(f"{plan} has no manifest ({manifest_path(plan).name}): its TensorRT version, GPU and "
                        "platform are unchecked, and it may carry its own runtime code (a version-compatible "
                        "plan), which is allowed")
        else:
            running = runtime_info()
            problem = incompatibility(manifest, running)
            if problem:
                raise EngineError(f"{plan} cannot run here: {problem}; rebuild it here with: "
                                  f"resnet-export trt --onnx {manifest.get('onnx', 'MODEL.onnx')} -o {plan}")
            caveat = gpu_caveat(manifest, running)
            if caveat:
                log.warning(f"{plan}: {caveat}")
        if manifest is None or manifest.get("options", {}).get("version_compatible"):
            # A version-compatible plan carries its own runtime code; the runtime must be allowed to run it
            # before deserializing (sampleEngines.cpp). Without a manifest nothing says whether the plan is
            # one (trtexec --versionCompatible writes none): Polygraphy's EngineFromBytes
            # (backend/trt/loader.py) sets the flag for every plan it loads.
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {plan} (see the TensorRT log above)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._dtypes = {n: getattr(torch, torch_dtype_name(self.engine.get_tensor_dtype(n).name, n)) for n in names}
        # device_memory_size_v2: what one context needs, for every profile (pyCore.cpp binds getDeviceMemorySizeV2).
        # torch's CUDA blocks are 512-byte aligned, above the 256 bytes TensorRT asks of this memory.
        self.scratch = self.device.empty((max(1, self.engine.device_memory_size_v2),), torch.uint8)
        self.context = self._new_context()
        self.stream = self.device.new_stream()
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple[int, ...], tuple] = {}
        self._lock = threading.Lock()
        self.name = f"trt:{plan.name}"

    def _new_context(self):
        """An execution context on the shared ``scratch`` block.

        The default allocation (STATIC) gives every context a block of its own, sized for all profiles,
        so each captured shape would cost a full activation block. USER_MANAGED contexts take the
        memory they are given (NvInferRuntime.h, ExecutionContextAllocationStrategy); sharing one is
        safe because this runner's contexts never run at the same time: all enqueue and replay in
        order on ``self.stream``. ``set_device_memory(memory, size)`` is pyCore.cpp's binding of
        setDeviceMemoryV2.
        """
        import tensorrt as trt

        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:  # createExecutionContext returns nullptr, e.g. when device memory runs out
            raise EngineError("TensorRT could not create an execution context (see the TensorRT log above)")
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        return context

    def _bind(self, context, batch, shape: tuple[int, ...]):
        """Set the input shape and both addresses on ``context``; returns the new output tensor."""
        # setInputShape returns false for a shape outside the optimization profile (NvInferRuntime.h);
        # running anyway would read past the buffer or return the wrong rows.
        if not context.set_input_shape(self.input_name, shape):
            low, high = self.profile_min_batch, self.profile_max_batch
            raise EngineError(f"batch shape {list(shape)} is outside the engine's profile (batch {low} to {high})")
        out = self.device.empty(tuple(context.get_tensor_shape(self.output_name)), self._dtypes[self.output_name])
        # setTensorAddress returns false for a misaligned or null address (TensorRT wants 256-byte alignment).
        for name, tensor in ((self.input_name, batch), (self.output_name, out)):
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise EngineError(f"TensorRT refused the buffer address of '{name}' (it must be 256-byte aligned)")
        return out

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.device.handle(self.stream)):
            raise EngineError("TensorRT execution failed (see the TensorRT log above)")

    def enqueue(self, batch):
        """Queue a run of a device tensor on ``self.stream`` and return its output tensor without waiting.

        The output is complete once ``self.stream`` has reached this point: synchronize the stream, or
        make another stream wait on it, before reading it (``infer_device`` synchronizes). What the
        benchmark times with CUDA events recorded on ``self.stream``. The tensor returned belongs to
        the caller: with CUDA graphs it is a copy of the graph's buffer.
        """
        shape = tuple(batch.shape)
        with self._lock:
            # The input was made (and cast) on torch's current stream: order the engine's stream after it.
            self.device.follow_current(self.stream, batch)
            with self.device.on(self.stream):
                batch = self._engine_buffer(batch)
                if self.cuda_graph and shape in self._graphs:
                    graph, static_in, static_out = self._graphs[shape][1:]
                    static_in.copy_(batch)
                    self.device.replay(graph)
                    return static_out.clone()
                if self.cuda_graph:
                    return self._capture(batch, shape)
                out = self._bind(self.context, batch, shape)
                self._execute(self.context)
                return out

    def _engine_buffer(self, batch):
        """``batch`` as TensorRT may read it: the engine's input type, contiguous, and at a 256-byte aligned address
        (setTensorAddress refuses others, NvInferRuntime.h), so a view at an offset or a cast copy made by torch's
        host allocator is copied into a buffer of the device's own."""
        dtype = self._dtypes[self.input_name]
        if batch.dtype == dtype and batch.is_contiguous() and batch.data_ptr() % 256 == 0:
            return batch
        buffer = self.device.empty(tuple(batch.shape), dtype)
        buffer.copy_(batch)
        return buffer

    def infer_device(self, batch):
        """Run a tensor already on the device; returns the device output tensor, complete (no host copies)."""
        out = self.enqueue(batch)
        self.device.synchronize(self.stream)
        return out

    def _capture(self, batch, shape: tuple[int, ...]):
        """Run once and capture the enqueue for ``shape`` in a context and buffers of its own.

        As trtexec does (sampleInference.cpp), a run comes first (TensorRT finishes its lazy set-up
        outside the capture), and the capture is thread-local on the runner's stream
        (``CudaDevice.capture``): a potentially unsafe CUDA call of another thread, such as another
        model's runner allocating memory in a serving thread, neither breaks the capture nor fails.
        A failed capture turns CUDA graphs off for this runner: every shape runs plain enqueues from then on.
        """
        context = self._new_context()
        static_in = self.device.empty(shape, batch.dtype)
        static_in.copy_(batch)
        static_out = self._bind(context, static_in, shape)
        self._execute(context)
        try:
            graph = self.device.capture(self.stream, lambda: context.execute_async_v3(self.device.handle(self.stream)))
        except RuntimeError:
            graph = None
        if graph is not None:
            self._graphs[shape] = (context, graph, static_in, static_out)
        else:
            self.cuda_graph = False  # this engine cannot be captured: plain enqueues from now on
            log.warning("CUDA graph capture of the TensorRT enqueue failed: running without CUDA graphs")
        return static_out.clone()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_device(self.device.upload(batch)).float().cpu().numpy()

    def clone(self) -> TrtRunner:
        """Another runner of the same plan, with its own engine, contexts, activation block and stream."""
        return TrtRunner(self.plan, cuda_graph=self.cuda_graph, manifest=self.manifest)

    @property
    def input_chw(self) -> tuple[int, ...]:
        """The input's shape without the batch axis (C, H, W)."""
        return tuple(self.engine.get_tensor_shape(self.input_name))[1:]

    @property
    def profile_opt_batch(self) -> int:
        """The batch the engine's optimization profile was tuned for."""
        return self.engine.get_tensor_profile_shape(self.input_name, 0)[1][0]

    @property
    def profile_min_batch(self) -> int:
        """The smallest batch the engine's optimization profile accepts."""
        return self.engine.get_tensor_profile_shape(self.input_name, 0)[0][0]

    @property
    def profile_max_batch(self) -> int:
        """The largest batch the engine's optimization profile accepts."""
        return self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0]
