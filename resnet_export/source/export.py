"""torch -> ONNX: FP32, dynamic (or fixed) batch, input ``input``, output ``logits``, metadata.

The file is written atomically, checked with ``onnx.checker`` (full check) and carries the
preprocessing spec and provenance in ``metadata_props`` for later stages.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import OnnxError, first_line, root_cause
from .fold import FoldReport, fold_onnx_batchnorm
from ..manifest import atomic_output
from ..onnx_graph import set_metadata
from ..preprocessing import Preprocessing

#: Opset 20: the torch dynamo exporter's native opset, and ModelOpt's quantizer and AutoCast need >= 19.
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's minimum
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(
    module: nn.Module,
    preprocessing: Preprocessing,
    output: str | Path,
    source: dict,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
) -> FoldReport:
    """Export an eval-mode module to ``output``; ``batch=None`` makes the batch axis dynamic.

    BatchNorms the exporter still emits are folded at ONNX level; the returned report lists any left.
    """
    if opset < MIN_OPSET:
        raise OnnxError(f"`opset` {opset} is too old; use {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
    # Batch 2 for a dynamic axis: torch.export specialises dimensions of size 1.
    example = torch.zeros(batch or 2, preprocessing.channels, *preprocessing.input_size)
    dynamic_shapes = None if batch else ({0: torch.export.Dim("batch")},)
    with atomic_output(output) as tmp:
        try:
            with warnings.catch_warnings(), _quiet_torch_logging():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, (example,), str(tmp), dynamo=True, external_data=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=dynamic_shapes, verbose=False,
                )
        except Exception as exc:  # the exporter raises many types; report the first line and the cause
            cause = root_cause(exc)
            detail = f" ({type(cause).__name__}: {first_line(cause)})" if cause is not exc else ""
            raise OnnxError(f"ONNX export failed: {first_line(exc)}{detail}") from exc
        model = onnx.load(str(tmp))
        report = fold_onnx_batchnorm(model)
        set_metadata(model, {"preprocessing": preprocessing.to_dict(), "source": source})
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
    return report


@contextlib.contextmanager
def _quiet_torch_logging():
    """Silence torch.export's graph dumps and warnings on stderr; errors still raise."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
