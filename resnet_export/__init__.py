"""resnet-export: deployable, verified artifacts from PyTorch residual networks.

The public API is exposed lazily (PEP 562): ``import resnet_export`` imports neither torch nor ONNX
Runtime; each name loads its module on first use, so the command line answers ``--help`` at once and
each spawned quantization worker imports only what it runs.
"""

from ._moved import install as _install_moved
from ._version import __version__

_install_moved()  # the module paths before the layout by stage import for one more release

#: Public name -> the module that defines it.
_API = {
    "GATES": "checks.verify",
    "PrecisionRequest": "pipeline",
    "build_engine": "engine.build",
    "compare": "checks.verify",
    "engine_from_onnx": "pipeline",
    "export_onnx": "source.export",
    "fold_batchnorm": "source.fold",
    "fold_onnx_batchnorm": "source.fold",
    "fold_onnx_file": "pipeline",
    "image_inputs": "data",
    "load_model": "source.models",
    "onnx_from_model": "pipeline",
    "precision_from_onnx": "pipeline",
    "quantize_int8": "quantize.precision",
    "random_inputs": "data",
    "read_metadata": "onnx_graph",
    "run_matrix": "bench.harness",
    "to_fp16": "quantize.precision",
    "trt_from_source": "pipeline",
    "verify": "checks.verify",
    "verify_artifact": "pipeline",
    "write_reports": "bench.report",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'resnet_export' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
