"""torch -> ONNX: FP32, dynamic (or fixed) batch, input ``input``, output ``logits``, metadata.

The file is written atomically, checked with ``onnx.checker`` (full check) and carries the
preprocessing spec and provenance in ``metadata_props`` for later stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch
from torch import nn

from .errors import OnnxError, first_line, root_cause
from .fold import FoldReport, fold_onnx_batchnorm
from .manifest import atomic_output
from .models import Preprocessing

#: Opset 20: the torch dynamo exporter's native opset, and ModelOpt's quantizer and AutoCast need >= 19.
DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's minimum
INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_PREFIX = "resnet_export."


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
        raise OnnxError(f"--opset {opset} is too old; use {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
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


def set_metadata(model: onnx.ModelProto, values: dict) -> None:
    """Store ``values`` (JSON-serialisable) in ``metadata_props`` under the toolkit's prefix."""
    from ._version import __version__

    values = {"version": __version__, **values}
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        prop = existing.get(META_PREFIX + key) or model.metadata_props.add()
        prop.key, prop.value = META_PREFIX + key, json.dumps(value)
    model.producer_name = "resnet-export"
    model.producer_version = __version__


def read_metadata(path_or_model) -> dict:
    """The toolkit's ``metadata_props`` of an ONNX file or model, decoded (empty for foreign files)."""
    model = load_onnx(path_or_model, load_weights=False) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    return {
        p.key[len(META_PREFIX):]: json.loads(p.value) for p in model.metadata_props if p.key.startswith(META_PREFIX)
    }


def load_onnx(path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, or raise one line saying why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"ONNX file {path} not found")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf DecodeError and friends
        raise OnnxError(f"{path} is not an ONNX model ({first_line(exc)})") from exc


def graph_inputs(model: onnx.ModelProto) -> list:
    """The model's real inputs (old exporters also list initializers as graph inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def input_dims(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """Name and dims (None where dynamic) of the model's first input."""
    first = graph_inputs(model)[0]
    return first.name, [d.dim_value or None for d in first.type.tensor_type.shape.dim]


def op_counts(model: onnx.ModelProto) -> Counter:
    """How many nodes of each op type the main graph has."""
    return Counter(node.op_type for node in model.graph.node)
