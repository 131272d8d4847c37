"""One Runner interface for every backend: ``name`` and ``infer(batch) -> logits`` on numpy arrays.

torch is imported only by the PyTorch runner, so that an ONNX Runtime or OpenVINO runner (a Ray actor, a
``predict`` process) does not pay its import (2.6 s measured).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import OnnxError, first_line

if TYPE_CHECKING:
    from torch import nn


class Runner(Protocol):
    """Anything that turns a preprocessed ``(N, C, H, W)`` float32 batch into ``(N, classes)`` logits."""

    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


class FirstCallTimer:
    """The seconds of the first call per input shape (``torch.compile`` compiles then), apart from the rest."""

    def __init__(self):
        self.seconds: dict[tuple[int, ...], float] = {}

    def run(self, shape: tuple[int, ...], call, wait=lambda: None):
        """``call()``; the first time for ``shape``, timed until ``wait()`` returns."""
        if shape in self.seconds:
            return call()
        start = time.perf_counter()
        out = call()
        wait()
        self.seconds[shape] = time.perf_counter() - start
        return out


def compile_module(module: nn.Module):
    """``torch.compile`` with inductor, one static graph per input shape (batch sizes are few and known)."""
    import torch

    return torch.compile(module, backend="inductor", dynamic=False)


class TorchRunner:
    """PyTorch on the CPU, FP32: eager, or compiled by inductor (``compiled``; ``compile_seconds`` per input shape)."""

    def __init__(self, module: nn.Module, name: str = "torch", compiled: bool = False):
        self.module = module.eval()
        self.name = name
        self.compiled = compiled
        self._forward = compile_module(self.module) if compiled else self.module
        self.first_calls = FirstCallTimer()

    @property
    def threads(self) -> int:
        """torch's intra-op thread setting (process-wide)."""
        import torch

        return torch.get_num_threads()

    @property
    def compile_seconds(self) -> dict[tuple[int, ...], float]:
        """Seconds of the first call per input shape of a compiled module (compile and one run); empty otherwise."""
        return self.first_calls.seconds if self.compiled else {}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from ..source.models import run_forward

        x = torch.from_numpy(np.ascontiguousarray(batch))
        return self.first_calls.run(tuple(x.shape), lambda: run_forward(self._forward, x)).float().numpy()


#: ONNX Runtime's OpenVINO execution provider, a plugin library (the onnxruntime-ep-openvino package, ORT >= 1.23)
#: registered with ``register_execution_provider_library`` and added per device, not named in ``providers``.
OPENVINO_EP = "OpenVINOExecutionProvider"


#: Providers that compute on ONNX Runtime's CPU kernels or OpenVINO's, whose float16 QuantizeLinear this runner
#: evaluates in float32 (ort_fixes); the CUDA and TensorRT providers run the artifact's graph as it is.
CPU_KERNEL_PROVIDERS = ("CPUExecutionProvider", OPENVINO_EP)

_REGISTERED: set[str] = set()  # plugin EPs this process registered with ONNX Runtime


def _openvino_ep_devices() -> list:
    """ONNX Runtime's CPU devices of the OpenVINO plugin EP, its library registered once per process."""
    import onnxruntime as ort
    import onnxruntime_ep_openvino as plugin

    if plugin.get_ep_name() not in _REGISTERED:
        ort.register_execution_provider_library(plugin.get_ep_name(), plugin.get_library_path())
        _REGISTERED.add(plugin.get_ep_name())
    return [d for d in ort.get_ep_devices()
            if d.ep_name == OPENVINO_EP and d.device.type == ort.OrtHardwareDeviceType.CPU]


def openvino_ep_unavailable() -> str | None:
    """Why ONNX Runtime's OpenVINO plugin EP cannot run on this CPU, or None.

    The plugin offers Intel devices only: its factory skips every device whose vendor is not Intel
    (onnxruntime/core/providers/openvino/ov_factory.cc, ``GetSupportedDevices``: "Not an Intel Device"),
    so on an AMD CPU it registers and offers nothing.
    """
    try:
        import onnxruntime_ep_openvino  # noqa: F401
    except ImportError:
        return "ONNX Runtime's OpenVINO plugin EP is not installed (pip install onnxruntime-ep-openvino, Linux x86_64)"
    if not _openvino_ep_devices():
        from ..cpu import cpu_info

        return (f"ONNX Runtime's OpenVINO plugin EP offers no device for this CPU ({cpu_info()['model'] or 'unknown'}): "
                "it runs on Intel CPUs only")
    return None


class OrtRunner:
    """An ONNX file (or serialized model bytes) on ONNX Runtime (CPU provider unless told otherwise).

    ``providers=["OpenVINOExecutionProvider"]`` runs it through ONNX Runtime's API on OpenVINO's CPU kernels
    (the onnxruntime-ep-openvino plugin), its float parts in float32 as the graph says (OpenVINO's CPU default
    may compute them in bf16) with the LATENCY hint, as ``OpenVinoRunner`` compiles an FP32 model.

    ``provider_options`` go to the first provider (``{"use_tf32": "0"}`` for CUDA). ``exact`` turns ONNX
    Runtime's graph optimizations off: no Q/DQ fusion into integer kernels, so the
    session computes the Q/DQ arithmetic as the graph writes it (the reference for ``cpu.py``'s
    saturation check). On CPU kernels (``CPU_KERNEL_PROVIDERS``), float16 QuantizeLinear nodes are evaluated in
    float32 so they round as the spec says (see ort_fixes); the CUDA and TensorRT providers get the graph as it is.
    """

    def __init__(self, path: str | Path | bytes, providers=("CPUExecutionProvider",), threads: int | None = None,
                 exact: bool = False, provider_options: dict | None = None):
        import onnxruntime as ort

        self.options = ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        if exact:
            self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.options.log_severity_level = 3
        self.providers = list(providers)
        self.provider_options = provider_options or {}
        if self.providers[0] == OPENVINO_EP:  # the plugin takes OpenVINO's own settings (it ignores `precision`)
            reason = openvino_ep_unavailable()
            if reason:
                raise OnnxError(reason)
            config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            self.options.add_provider_for_devices(_openvino_ep_devices(), {"load_config": json.dumps({"CPU": config})})
        self.what = "the model" if isinstance(path, bytes) else path
        #: float16 QuantizeLinear nodes evaluated in float32 (see ort_fixes); 0 for most models.
        self.fp16_quantize_rewritten = 0
        self.session = self._session(path if isinstance(path, bytes) else str(path))
        if providers[0] in CPU_KERNEL_PROVIDERS and self._may_hold_fp16_quantize():
            self._round_fp16_quantize(path)
        self.input_name = self.session.get_inputs()[0].name
        batch_dim = self.session.get_inputs()[0].shape[0]
        #: The batch size the model was exported for, or None for a dynamic batch axis.
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        self.name = "ort" if isinstance(path, bytes) else f"ort:{Path(path).name}"

    def _session(self, model: str | bytes):
        import onnxruntime as ort

        try:
            plugin = self.providers[0] == OPENVINO_EP  # added to the options with its devices
            providers = [(name, self.provider_options if i == 0 else {}) for i, name in enumerate(self.providers)]
            session = ort.InferenceSession(model, self.options, providers=None if plugin else providers)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise OnnxError(f"ONNX Runtime cannot load {self.what}: {first_line(exc)}") from exc
        used = session.get_providers()
        if self.providers[0] not in used:  # ONNX Runtime falls back to the CPU with only a log line
            raise OnnxError(f"ONNX Runtime could not use {self.providers[0]} (it fell back to {', '.join(used)}); "
                            "check its CUDA/cuDNN/TensorRT libraries")
        return session

    def _may_hold_fp16_quantize(self) -> bool:
        """Whether the loaded model can hold float16 QuantizeLinear, read from the toolkit's metadata.

        Only a TensorRT-target INT8 model with the rest in FP16 does; a model without the toolkit's
        metadata (made elsewhere) is looked at node by node.
        """
        import json

        from ..onnx_graph import META_PREFIX

        metadata = self.session.get_modelmeta().custom_metadata_map
        if not any(key.startswith(META_PREFIX) for key in metadata):
            return True
        return json.loads(metadata.get(META_PREFIX + "precision", "{}")).get("rest") == "fp16"

    def _round_fp16_quantize(self, path: str | Path | bytes) -> None:
        """Reload the session from a rewrite whose float16 QuantizeLinear compute in float32, if it has any."""
        import onnx

        from .ort_fixes import quantize_in_fp32

        proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
        self.fp16_quantize_rewritten = quantize_in_fp32(proto)
        if self.fp16_quantize_rewritten:
            self.session = self._session(proto.SerializeToString())

    @property
    def threads(self) -> int | str:
        """The session's intra-op thread setting, as its options say ("default": ONNX Runtime's own choice)."""
        return self.session.get_session_options().intra_op_num_threads or "default"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class OpenVinoRunner:
    """An ONNX file compiled by OpenVINO for its CPU device (the CPU peer users compare against)."""

    def __init__(self, path: Path, precision: str, threads: int | None):
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if precision == "fp32":  # OpenVINO's CPU default may compute in bf16; FP32 rows compute in FP32
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.name = f"openvino:{path.name}"

    @property
    def threads(self) -> int:
        """The compiled model's inference-thread setting (OpenVINO resolves its default to a number)."""
        return int(self.compiled.get_property("INFERENCE_NUM_THREADS"))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: batch})[0])


def ort_providers() -> tuple[str, ...]:
    """ONNX Runtime's CUDA provider where a GPU is visible, else the CPU's (asked of the driver, not of torch, so
    that an ONNX Runtime process never imports it)."""
    import onnxruntime as ort

    from .device import cuda_gpus

    if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_gpus() > 0:
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)
