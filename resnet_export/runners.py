"""One Runner interface for every backend: ``name`` and ``infer(batch) -> logits`` on numpy arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .errors import OnnxError, first_line
from .models import run_forward


class Runner(Protocol):
    """Anything that turns a preprocessed ``(N, C, H, W)`` float32 batch into ``(N, classes)`` logits."""

    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """PyTorch eager on the CPU, FP32."""

    def __init__(self, module: nn.Module, name: str = "torch"):
        self.module = module.eval()
        self.name = name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return run_forward(self.module, torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()


class OrtRunner:
    """An ONNX file (or serialized model bytes) on ONNX Runtime (CPU provider unless told otherwise)."""

    def __init__(self, path: str | Path | bytes, providers=("CPUExecutionProvider",), threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        #: float16 QuantizeLinear nodes evaluated in float32 on the CPU (see ort_fixes); 0 for most models.
        self.fp16_quantize_rewritten = 0
        try:
            model = path if isinstance(path, bytes) else str(path)
            if providers[0] == "CPUExecutionProvider":
                model = self._cpu_exact(model)
            self.session = ort.InferenceSession(model, options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            what = "the model" if isinstance(path, bytes) else path
            raise OnnxError(f"ONNX Runtime cannot load {what}: {first_line(exc)}") from exc
        used = self.session.get_providers()
        if providers[0] not in used:  # ONNX Runtime falls back to the CPU with only a log line
            raise OnnxError(f"ONNX Runtime could not use {providers[0]} (it fell back to {', '.join(used)}); "
                            "check its CUDA/cuDNN/TensorRT libraries")
        self.input_name = self.session.get_inputs()[0].name
        batch_dim = self.session.get_inputs()[0].shape[0]
        #: The batch size the model was exported for, or None for a dynamic batch axis.
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        self.name = "ort" if isinstance(path, bytes) else f"ort:{Path(path).name}"

    def _cpu_exact(self, model: str | bytes) -> str | bytes:
        """``model`` as is, or rewritten so the CPU rounds float16 QuantizeLinear as the spec says."""
        import onnx

        from .ort_fixes import fp16_quantize_nodes, quantize_in_fp32

        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
        if not fp16_quantize_nodes(proto):
            return model
        self.fp16_quantize_rewritten = quantize_in_fp32(proto)
        return proto.SerializeToString()

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

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: batch})[0])
