"""Reading a plan: its layers and the precision each runs in, as TensorRT's engine inspector reports them."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np


#: Tokens of TensorRT's "Format/Datatype" strings (engine inspector, DETAILED) and the precision each names;
#: bf16 before fp16, fp16 before "float" ("bfloat16", "Half"), as NVIDIA's formats spell them.
FORMAT_PRECISIONS = (("int8", "INT8"), ("fp8", "FP8"), ("bf16", "BF16"), ("bfloat16", "BF16"), ("fp16", "FP16"),
                     ("half", "FP16"), ("fp32", "FP32"), ("float", "FP32"), ("int32", "INT32"), ("int64", "INT64"),
                     ("bool", "BOOL"))


def format_precision(text: str) -> str:
    """The precision a TensorRT tensor format names (``Channel major FP16 format ...`` -> FP16); else the text."""
    lowered = text.lower()
    return next((name for token, name in FORMAT_PRECISIONS if token in lowered), text or "?")


def engine_layers(information: dict) -> list[dict] | None:
    """Each layer of an engine inspector's JSON (``get_engine_information``) as name, type, the precisions
    of its inputs and outputs, and its tactic; None for a plan built without DETAILED profiling
    verbosity, whose inspector lists layer names only (TensorRT developer guide, "Engine Inspector")."""
    layers = information.get("Layers", [])
    if not layers or not all(isinstance(layer, dict) for layer in layers):
        return None

    def precisions(tensors: list[dict]) -> list[str]:
        return [format_precision(t.get("Format/Datatype", "")) for t in tensors]

    def convolution(layer: dict) -> bool:
        kinds = {layer.get("ParameterType"), layer.get("ConvParameterType")} - {None}
        return "Convolution" in kinds if kinds else "Conv" in layer.get("LayerType", "")

    return [{"name": layer.get("Name", ""), "type": layer.get("LayerType", ""), "convolution": convolution(layer),
             "inputs": precisions(layer.get("Inputs", [])), "outputs": precisions(layer.get("Outputs", [])),
             "tactic": layer.get("TacticName") or layer.get("TacticValue") or ""} for layer in layers]


def convolution_precisions(layers: list[dict]) -> dict[str, int]:
    """How many convolution layers take each input precision: where the INT8 convs of a Q/DQ model show.

    A convolution is a layer whose inspector parameters are a convolution's: ``ParameterType`` "Convolution"
    (``CaskConvolution`` and its kin) or ``ConvParameterType`` "Convolution" (a fused ``ConvActPool``, the stem of
    NVIDIA's INT8 ResNet-18 example); the layer type itself only when the inspector gives no parameter types.
    """
    return dict(Counter(layer["inputs"][0] for layer in layers if layer["inputs"] and layer["convolution"]))


def describe_plan(path: Path) -> dict:
    """The plan as TensorRT reads it: I/O, profile, and each layer with its precisions and tactic.

    The inspector is given a context whose input shape is set (the profile's opt batch): with dynamic
    shapes and no context it reports "N/A due to dynamic shapes" instead of formats (TensorRT
    developer guide, "Engine Inspector").
    """
    from .runner import TrtRunner
    from .tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason:
        return {"unavailable": f"engine details need TensorRT and a GPU: {reason}"}
    import tensorrt as trt

    runner = TrtRunner(path)
    engine = runner.engine
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    profile = [list(s) for s in engine.get_tensor_profile_shape(runner.input_name, 0)]
    runner.context.set_input_shape(runner.input_name, profile[1])
    inspector = engine.create_engine_inspector()
    inspector.execution_context = runner.context
    layers = engine_layers(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)))
    return {
        "io": [{"name": n, "mode": engine.get_tensor_mode(n).name, "dtype": engine.get_tensor_dtype(n).name,
                "shape": list(engine.get_tensor_shape(n))} for n in names],
        "profile": profile,
        "layers": layers,
        "convolutions": convolution_precisions(layers) if layers is not None else None,
    }
