"""TensorRT: availability, engine build and load. TensorRT is imported lazily, only here.

Precision is not chosen here: TensorRT 11 removed the precision flags, so the engine is built
strongly typed from an ONNX whose graph already carries FP16 casts or INT8 Q/DQ nodes.
"""

from __future__ import annotations

from .errors import EXIT_TRT_UNAVAILABLE, ResnetExportError


class TensorRTUnavailable(ResnetExportError):
    """TensorRT or a CUDA GPU is missing: the ONNX is kept and no engine is written."""

    exit_code = EXIT_TRT_UNAVAILABLE


def unavailable_reason() -> str | None:
    """Why an engine cannot be built on this machine (None when TensorRT and a CUDA GPU are present)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT is not installed ({exc}); install it with: pip install 'resnet-export[trt]'"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None
