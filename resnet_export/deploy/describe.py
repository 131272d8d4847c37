"""What an artifact is: I/O, op mix, precision, Q/DQ and BatchNorm counts, and its manifest."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import OnnxError
from ..engine.inspector import describe_plan
from ..manifest import manifest_path


def describe(artifact: str | Path) -> dict:
    """A JSON-ready description of an ``.onnx`` file or a TensorRT plan."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise OnnxError(f"{artifact} not found")
    from ..cpu import cpu_info

    sidecar = manifest_path(artifact)
    manifest = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    # The CPU that verified the artifact when it was made, and this one (INT8 on the CPU depends on both).
    machines = {"verified_on": ((manifest or {}).get("verification") or {}).get("cpu"), "this_machine": cpu_info()}
    if artifact.suffix == ".onnx":
        return {"artifact": str(artifact), **_describe_onnx(artifact), "cpu": machines, "manifest": manifest,
                "serving": _serving(artifact, manifest)}
    return {"artifact": str(artifact), "engine": describe_plan(artifact), "cpu": machines, "manifest": manifest}


def _serving(artifact: Path, manifest: dict | None) -> dict | None:
    """For a CPU-target INT8 ONNX: OpenVINO's recorded verification, this CPU's kernel class, and whether that
    result lets ``predict`` serve it with OpenVINO here (without verifying it first)."""
    from ..cpu import cpu_info
    from ..checks.serving import cpu_int8, kernel_class

    if not cpu_int8(artifact):
        return None
    recorded = ((manifest or {}).get("backends") or {}).get("openvino")
    here = kernel_class(cpu_info())
    return {"openvino": recorded, "this_kernel_class": here,
            "openvino_verified_here": bool(recorded and recorded["passed"] and recorded["kernel_class"] == here)}


def _describe_onnx(path: Path) -> dict:
    import onnx

    from ..onnx_graph import graph_inputs, graph_precision, load_onnx, onnx_opset, op_counts, qdq_summary, read_metadata

    model = load_onnx(path)

    def io(values):
        return [{"name": v.name, "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    metadata = read_metadata(model)
    return {
        "opset": onnx_opset(model),
        "inputs": io(graph_inputs(model)),
        "outputs": io(model.graph.output),
        "precision": graph_precision(model),
        "counts": qdq_summary(model),
        "ops": dict(op_counts(model).most_common()),
        "preprocessing": {k: v for k, v in metadata.get("preprocessing", {}).items() if k != "class_names"},
    }
