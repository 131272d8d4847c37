"""resnet-export: deployable, verified artifacts from PyTorch residual networks."""

__version__ = "0.1.0"

from .bench import run_matrix, write_reports  # noqa: E402
from .data import image_inputs, random_inputs  # noqa: E402
from .export import export_onnx, read_metadata  # noqa: E402
from .fold import fold_batchnorm, fold_onnx_batchnorm  # noqa: E402
from .models import load_model  # noqa: E402
from .pipeline import (  # noqa: E402
    engine_from_onnx,
    fold_onnx_file,
    onnx_from_model,
    precision_from_onnx,
    trt_from_source,
    verify_artifact,
)
from .precision import quantize_int8, to_fp16  # noqa: E402
from .trt import build_engine  # noqa: E402
from .verify import GATES, compare, verify  # noqa: E402

__all__ = [
    "GATES",
    "build_engine",
    "compare",
    "engine_from_onnx",
    "export_onnx",
    "fold_batchnorm",
    "fold_onnx_batchnorm",
    "fold_onnx_file",
    "image_inputs",
    "load_model",
    "onnx_from_model",
    "precision_from_onnx",
    "quantize_int8",
    "random_inputs",
    "read_metadata",
    "run_matrix",
    "to_fp16",
    "trt_from_source",
    "verify",
    "verify_artifact",
    "write_reports",
]
