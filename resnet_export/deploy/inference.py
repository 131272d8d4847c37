"""An artifact opened for inference on images, and its outputs ranked: what ``predict`` needs locally and on Ray.

Images are preprocessed as the artifact's metadata says (a plan: its ONNX's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import DataError, class_indices
from ..onnx_graph import graph_precision, onnx_preprocessing
from ..preprocessing import Preprocessing
from ..runtime.batches import batch_plan
from ..checks.serving import default_onnx_backend
from ..runtime.runners import ort_providers

BACKENDS = ("ort", "openvino", "trt")


def open_artifact(artifact: Path, backend: str | None = None):
    """The runner for ``artifact`` on ``backend`` (ort or openvino for an ONNX, trt for a plan), its
    preprocessing and the backend's name."""
    from ..runtime.runners import OpenVinoRunner, OrtRunner

    is_onnx = artifact.suffix == ".onnx"
    if not is_onnx and artifact.suffix not in (".plan", ".engine"):
        raise DataError(f"{artifact}: expected an .onnx file or a TensorRT .plan")
    if not artifact.is_file():
        raise DataError(f"{artifact} not found")
    backend = backend or (default_onnx_backend(artifact) if is_onnx else "trt")
    if backend not in BACKENDS:
        raise DataError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if is_onnx == (backend == "trt"):
        raise DataError(f"backend {backend} does not run {artifact.suffix} files: ort and openvino run an ONNX, trt a plan")
    if backend == "trt":
        from ..engine.runner import TrtRunner
        from ..engine.tensorrt import load_manifest

        manifest = load_manifest(artifact) or {}
        source = Path(manifest.get("onnx", ""))
        if not source.is_file():
            raise DataError(f"{artifact}: its preprocessing comes from the ONNX it was built from, which its "
                            f"manifest does not name or which is gone ({source or 'no manifest'})")
        return TrtRunner(artifact), onnx_preprocessing(source), backend
    spec = onnx_preprocessing(artifact)
    if backend == "openvino":
        precision = graph_precision(artifact)["dtype"]
        return OpenVinoRunner(artifact, precision, None), spec, backend
    return OrtRunner(artifact, ort_providers()), spec, backend


def batch_sizes(runner, count: int, batch: int) -> list[int]:
    """Batches for ``count`` images: the runner's fixed batch, its engine profile, or ``batch`` at a time."""
    if getattr(runner, "fixed_batch", None):
        return batch_plan(count, runner.fixed_batch)
    if hasattr(runner, "profile_max_batch"):
        return batch_plan(count, None, min(batch, runner.profile_max_batch), runner.profile_min_batch)
    return [batch] * (count // batch) + ([count % batch] if count % batch else [])


def ranked(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and softmax scores of the ``k`` best classes of each row, best first."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    scores = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def row(path, indices: np.ndarray, scores: np.ndarray, names: list[str] | None) -> dict:
    """One output row: the image path and its classes, best first."""
    return {"path": str(path), "topk": [
        {"index": int(i), "class": names[i] if names and i < len(names) else None, "score": float(s)}
        for i, s in zip(indices, scores)]}


def label_index(classes: list[str] | None, spec: Preprocessing, outputs: int) -> dict[str, int] | None:
    """Folder name -> class index when the ImageFolder folders are the model's classes, else None.

    The rule verification uses (``Inputs.labels_for``): folders by the model's class names or numbers,
    or in sorted order when there are exactly as many as the model's outputs.
    """
    if not classes or not outputs:
        return None
    index, by_order = class_indices(classes, spec.class_names)
    if (by_order and len(classes) != outputs) or max(index.values()) >= outputs:
        return None
    return index
