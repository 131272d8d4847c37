"""Run an artifact on every image of a folder: the top-k classes of each, written as JSONL or CSV.

Images are preprocessed as the artifact's metadata says (a plan: its ONNX's). Unreadable images are
counted and skipped; with the ImageFolder layout whose folders are the model's classes, the result
carries the top-1 accuracy.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DataError, Inputs, class_indices, decode_readable, find_images
from .manifest import atomic_output, check_not_input, check_writable_dir
from .onnx_graph import onnx_preprocessing, read_metadata
from .preprocessing import Preprocessing
from .progress import task
from .verify import batch_plan, run_batches

log = logging.getLogger(__name__)

FORMATS = (".jsonl", ".csv")
BACKENDS = ("ort", "openvino", "trt")


@dataclass
class PredictResult:
    """What ``predict_folder`` wrote: how many images, which were skipped, and the accuracy with labels."""

    output: Path
    predicted: int
    skipped: list[str] = field(default_factory=list)
    accuracy: float | None = None
    backend: str = "ort"


def open_artifact(artifact: Path, backend: str | None = None):
    """The runner for ``artifact`` on ``backend`` (ort or openvino for an ONNX, trt for a plan) and its preprocessing."""
    from .runners import OpenVinoRunner, OrtRunner

    is_onnx = artifact.suffix == ".onnx"
    if not is_onnx and artifact.suffix not in (".plan", ".engine"):
        raise DataError(f"{artifact}: expected an .onnx file or a TensorRT .plan")
    if not artifact.is_file():
        raise DataError(f"{artifact} not found")
    backend = backend or ("ort" if is_onnx else "trt")
    if backend not in BACKENDS:
        raise DataError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if is_onnx == (backend == "trt"):
        raise DataError(f"backend {backend} does not run {artifact.suffix} files: ort and openvino run an ONNX, trt a plan")
    if backend == "trt":
        from .trt import TrtRunner, load_manifest

        manifest = load_manifest(artifact) or {}
        source = Path(manifest.get("onnx", ""))
        if not source.is_file():
            raise DataError(f"{artifact}: its preprocessing comes from the ONNX it was built from, which its "
                            f"manifest does not name or which is gone ({source or 'no manifest'})")
        return TrtRunner(artifact), onnx_preprocessing(source), backend
    spec = onnx_preprocessing(artifact)
    if backend == "openvino":
        precision = read_metadata(artifact).get("precision", {}).get("dtype", "fp32")
        return OpenVinoRunner(artifact, precision, None), spec, backend
    return OrtRunner(artifact, _ort_providers()), spec, backend


def _ort_providers() -> tuple[str, ...]:
    """ONNX Runtime's CUDA provider where a GPU is visible, else the CPU's."""
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def _batch_sizes(runner, count: int, batch: int) -> list[int]:
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


def predict_folder(artifact: str | Path, images: str | Path, output: str | Path, *, top_k: int = 5,
                   batch: int = 32, backend: str | None = None, ray_address: str | None = None,
                   workers: int = 2) -> PredictResult:
    """Run ``artifact`` on every image under ``images`` and write the ``top_k`` best classes to ``output``.

    ``output`` ends in .jsonl (one object per image: path, topk of index, class, score) or .csv
    (path, then index, class, score per rank); it is written atomically. With ``ray_address``
    (``"local"``, ``"auto"`` or ``"ray://host:port"``) the job runs on Ray Data: images decoded in
    tasks, inference in ``workers`` actors holding one session each; the rows are the same.
    """
    artifact, images, output = Path(artifact), Path(images), Path(output)
    if output.suffix.lower() not in FORMATS:
        raise DataError(f"output {output} must end in {' or '.join(FORMATS)}")
    if top_k < 1 or batch < 1:
        raise DataError("`top_k` and `batch` must be positive")
    check_writable_dir(output)
    check_not_input([output], [artifact])
    runner, spec, backend = open_artifact(artifact, backend)
    paths, classes = find_images(images)
    if ray_address:
        from .predict_ray import run_on_ray

        rows, labels, skipped = run_on_ray(artifact, backend, spec, images, paths, classes, top_k, batch,
                                           ray_address, workers)
    else:
        rows, labels, skipped = _run(runner, spec, images, paths, classes, top_k, batch)
    if not rows:
        raise DataError(f"no readable image among {len(paths)} files under {images}")
    if skipped:
        log.warning(f"skipped {len(skipped)} unreadable images of {len(paths)}: {', '.join(skipped[:5])}"
                    + (", ..." if len(skipped) > 5 else ""))
    accuracy = None
    if labels is not None:
        accuracy = float(np.mean([row["topk"][0]["index"] == label for row, label in zip(rows, labels)]))
    with atomic_output(output) as tmp:
        _write(tmp, rows, top_k, output.suffix.lower())
    return PredictResult(output, len(rows), skipped, accuracy, backend)


def _run(runner, spec: Preprocessing, root: Path, paths: list[Path], classes: list[str] | None, top_k: int,
         batch: int) -> tuple[list[dict], list[int] | None, list[str]]:
    """Decode, run and rank the images batch by batch; returns the rows, labels (or None) and skipped files."""
    rows, skipped, outputs = [], [], 0
    names = spec.class_names
    with task(log, f"Predicting {len(paths)} images", len(paths)) as advance:
        for start in range(0, len(paths), batch):
            arrays, kept, failures = decode_readable(paths[start:start + batch], spec, advance)
            skipped += failures
            if not kept:
                continue
            logits = run_batches(runner, np.stack(arrays), _batch_sizes(runner, len(kept), batch))
            outputs = logits.shape[1]
            indices, scores = ranked(logits, top_k)
            rows += [row(path, i, s, names) for path, i, s in zip(kept, indices, scores)]
    return rows, folder_labels(rows, root, classes, spec, outputs), skipped


def row(path, indices: np.ndarray, scores: np.ndarray, names: list[str] | None) -> dict:
    """One output row: the image path and its classes, best first."""
    return {"path": str(path), "topk": [
        {"index": int(i), "class": names[i] if names and i < len(names) else None, "score": float(s)}
        for i, s in zip(indices, scores)]}


def folder_labels(rows: list[dict], root: Path, classes: list[str] | None, spec: Preprocessing,
                  outputs: int) -> list[int] | None:
    """The label of each row from its ImageFolder class, or None where folders are not the model's classes."""
    if not classes or not rows:
        return None
    index, by_order = class_indices(classes, spec.class_names)
    labels = [index[Path(r["path"]).relative_to(root).parts[0]] for r in rows]
    usable = Inputs(np.empty(0), np.array(labels), "", by_order).labels_for(outputs)  # the same rule as verification
    return None if usable is None else labels


def _write(path: Path, rows: list[dict], top_k: int, suffix: str) -> None:
    with open(path, "w", newline="") as f:
        if suffix == ".jsonl":
            for row in rows:
                f.write(json.dumps(row) + "\n")
            return
        writer = csv.writer(f)
        writer.writerow(["path", *[f"{name}_{rank}" for rank in range(1, top_k + 1) for name in ("index", "class", "score")]])
        for row in rows:
            cells = [row["path"]]
            for entry in row["topk"]:
                cells += [entry["index"], entry["class"] or "", f"{entry['score']:.6g}"]
            writer.writerow(cells)
