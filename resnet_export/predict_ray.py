"""``predict`` on a Ray cluster: Ray Data decodes in tasks and runs one inference session per actor.

The file list becomes a dataset; ``map_batches`` decodes and preprocesses each batch in tasks, then a
pool of ``workers`` actors (``ActorPoolStrategy``), each holding one runner of the artifact, ranks the
classes. The rows come back to the driver and are written exactly as the local path writes them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .data import DataError
from .preprocessing import Preprocessing
from .progress import task

log = logging.getLogger(__name__)


def decode(batch: dict, spec: dict) -> dict:
    """Ray task body: preprocess a batch of image paths; unreadable ones get an error and zeros."""
    from .data import read_image

    preprocessing = Preprocessing.from_dict(spec)
    blank = np.zeros((preprocessing.channels, *preprocessing.input_size), np.float32)
    images, errors = [], []
    for path in batch["path"]:
        array, error = read_image(path, preprocessing)
        images.append(blank if error else array)
        errors.append(error or "")
    return {"path": batch["path"], "image": np.stack(images), "error": np.array(errors)}


class Rank:
    """Ray actor: one runner of the artifact, ranking the classes of the readable images of a batch."""

    def __init__(self, artifact: str, backend: str, top_k: int, batch: int):
        from .predict import open_artifact

        self.runner = open_artifact(Path(artifact), backend)[0]
        self.top_k, self.batch = top_k, batch

    def __call__(self, batch: dict) -> dict:
        from .predict import _batch_sizes, ranked
        from .verify import run_batches

        ok = batch["error"] == ""
        indices = np.full((len(ok), self.top_k), -1, np.int64)
        scores = np.zeros((len(ok), self.top_k), np.float64)
        if ok.any():
            images = batch["image"][ok]
            logits = run_batches(self.runner, images, _batch_sizes(self.runner, len(images), self.batch))
            indices[ok], scores[ok] = ranked(logits, self.top_k)
            outputs = np.full(len(ok), logits.shape[1])
        else:
            outputs = np.zeros(len(ok), np.int64)
        return {"path": batch["path"], "error": batch["error"], "indices": indices, "scores": scores,
                "outputs": outputs}


def run_on_ray(artifact: Path, backend: str, spec: Preprocessing, root: Path, paths: list[Path],
               classes: list[str] | None, top_k: int, batch: int, address: str,
               workers: int) -> tuple[list[dict], list[int] | None, list[str]]:
    """The rows, labels and skipped files of ``predict_folder``, computed on Ray (``address``: local, auto, ray://...)."""
    try:
        import ray
        from ray.data import ActorPoolStrategy
    except ImportError as exc:
        raise DataError(f"`ray` needs Ray Data, which is not installed ({exc}): pip install 'resnet-export[ray]'") from exc
    from .predict import folder_labels, row

    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with task(log, f"Predicting {len(paths)} images on Ray ({workers} workers)"):
            dataset = ray.data.from_items([{"path": str(p)} for p in paths])
            decoded = dataset.map_batches(decode, fn_kwargs={"spec": spec.to_dict()}, batch_size=batch,
                                          batch_format="numpy")
            ranked_rows = decoded.map_batches(
                Rank, fn_constructor_kwargs={"artifact": str(artifact.resolve()), "backend": backend,
                                             "top_k": top_k, "batch": batch},
                compute=ActorPoolStrategy(size=workers), batch_size=batch, batch_format="numpy").take_all()
    finally:
        if started:
            ray.shutdown()
    order = {str(p): i for i, p in enumerate(paths)}
    ranked_rows.sort(key=lambda r: order[r["path"]])  # the local order: the sorted file list
    names, rows, skipped = spec.class_names, [], []
    for item in ranked_rows:
        if item["error"]:
            skipped.append(f"{Path(item['path']).name} ({item['error']})")
        else:
            rows.append(row(item["path"], item["indices"], item["scores"], names))
    outputs = max((int(item["outputs"]) for item in ranked_rows), default=0)
    return rows, folder_labels(rows, root, classes, spec, outputs), skipped
