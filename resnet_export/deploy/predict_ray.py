"""``predict`` on a Ray cluster: Ray Data decodes in tasks and runs one inference session per actor.

The file list becomes a dataset; ``map_batches`` decodes and preprocesses each batch in tasks, then a
pool of ``workers`` actors (``ActorPoolStrategy``), each holding one runner of the artifact, ranks the
classes. The driver iterates the results in the files' order (``preserve_order``) and ``predict``
streams them to its partial file exactly as the local path does, so resuming works the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..preprocessing import Preprocessing
from ..progress import task
from ..ray_cluster import ray_data

log = logging.getLogger(__name__)


def decode(batch: dict, spec: dict) -> dict:
    """Ray task body: preprocess a batch of image paths; unreadable ones get an error and zeros."""
    from ..image_stream import read_image

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
        from .inference import open_artifact

        self.runner = open_artifact(Path(artifact), backend)[0]
        self.top_k, self.batch = top_k, batch

    def __call__(self, batch: dict) -> dict:
        from .inference import batch_sizes, ranked
        from ..runtime.batches import run_batches

        ok = batch["error"] == ""
        indices = np.full((len(ok), self.top_k), -1, np.int64)
        scores = np.zeros((len(ok), self.top_k), np.float64)
        if ok.any():
            images = batch["image"][ok]
            logits = run_batches(self.runner, images, batch_sizes(self.runner, len(images), self.batch))
            indices[ok], scores[ok] = ranked(logits, self.top_k)
            outputs = np.full(len(ok), logits.shape[1])
        else:
            outputs = np.zeros(len(ok), np.int64)
        return {"path": batch["path"], "error": batch["error"], "indices": indices, "scores": scores,
                "outputs": outputs, "worker": np.full(len(ok), os.getpid())}


def rows_on_ray(artifact: Path, backend: str, spec: Preprocessing, paths: list[Path], top_k: int, batch: int,
                address: str, workers: int,
                ran_on: set[int] | None = None) -> Iterator[tuple[list[dict], list[str], int]]:
    """(rows, unreadable files, number of classes) per batch, computed on Ray (``address``: local, auto,
    ray://...), in the order of ``paths``. ``ran_on`` collects the process ids of the actors that ranked batches.
    A Ray started here is shut down at the end."""
    from .inference import row

    if not paths:
        return
    with ray_data(address) as ray:
        from ray.data import ActorPoolStrategy

        with task(log, f"Predicting {len(paths)} images on Ray ({workers} workers)", len(paths)) as advance:
            dataset = ray.data.from_items([{"path": str(p)} for p in paths])
            decoded = dataset.map_batches(decode, fn_kwargs={"spec": spec.to_dict()}, batch_size=batch,
                                          batch_format="numpy")
            ranked_batches = decoded.map_batches(
                Rank, fn_constructor_kwargs={"artifact": str(artifact.resolve()), "backend": backend,
                                             "top_k": top_k, "batch": batch},
                compute=ActorPoolStrategy(size=workers), batch_size=batch, batch_format="numpy")
            for item in ranked_batches.iter_batches(batch_size=batch, batch_format="numpy"):
                ok = item["error"] == ""
                rows = [row(path, indices, scores, spec.class_names) for path, indices, scores
                        in zip(item["path"][ok], item["indices"][ok], item["scores"][ok])]
                failures = [f"{Path(path).name} ({error})" for path, error in zip(item["path"][~ok], item["error"][~ok])]
                advance(len(ok))
                if ran_on is not None:
                    ran_on.update(int(pid) for pid in item["worker"])
                yield rows, failures, int(item["outputs"].max(initial=0))
