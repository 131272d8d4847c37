"""resnet-export: deployable, verified artifacts from PyTorch residual networks."""

__version__ = "0.1.0"

from .data import image_inputs, random_inputs  # noqa: E402
from .export import export_onnx, read_metadata  # noqa: E402
from .fold import fold_batchnorm, fold_onnx_batchnorm  # noqa: E402
from .models import load_model  # noqa: E402
from .pipeline import fold_onnx_file, onnx_from_model  # noqa: E402
from .verify import GATES, compare, verify  # noqa: E402

__all__ = [
    "GATES",
    "compare",
    "export_onnx",
    "fold_batchnorm",
    "fold_onnx_batchnorm",
    "fold_onnx_file",
    "image_inputs",
    "load_model",
    "onnx_from_model",
    "random_inputs",
    "read_metadata",
    "verify",
]
