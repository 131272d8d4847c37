"""Where the commands write when no ``-o`` is given: names from the model, precision and target."""

from __future__ import annotations
import re
from dataclasses import replace
from pathlib import Path
import numpy as np


def side_onnx_path(plan: Path, precision: str) -> Path:
    """Where ``trt`` keeps the precision ONNX of ``plan``: ``OUT.fp16.onnx`` for ``OUT.plan``, and so on;
    ``resnet50.int8.onnx`` for ``resnet50.int8.plan``, whose name already says it.

    The precision in the name keeps it apart from the FP32 ONNX a user typically names ``OUT.onnx``.
    """
    if plan.stem.endswith(f".{precision}"):
        return plan.with_suffix(".onnx")
    return plan.with_name(f"{plan.stem}.{precision}.onnx")


#: Precision parts of a file name that a default output name replaces rather than repeats.
_PRECISION_PARTS = re.compile(r"\.(fp32|fp16|int8|cpu-int8)$")


def default_output(stem: str, precision: str = "fp32", target: str = "trt", suffix: str = ".onnx") -> Path:
    """The output a command writes in the current directory when ``-o`` is not given, named from the model (or its
    input's stem), precision and target: ``resnet50.onnx``, ``resnet50.fp16.onnx``, ``resnet50.int8.onnx`` (TensorRT
    target), ``resnet50.cpu-int8.onnx``, ``resnet50.int8.plan``."""
    stem = _PRECISION_PARTS.sub("", stem)
    part = "" if precision == "fp32" else f".{'cpu-' if precision == 'int8' and target == 'cpu' else ''}{precision}"
    return Path(f"{stem}{part}{suffix}")
