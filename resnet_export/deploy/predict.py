"""Run an artifact on every image of a folder: the top-k classes of each, streamed to JSONL or CSV.

Rows are appended to ``OUT.partial`` as batches finish and the file is renamed to ``OUT`` only when
the folder is done, so a killed run never leaves an ``OUT`` that looks complete; ``resume`` continues
from the partial file and skips the images it holds. Locally, the decoder pool (``image_stream``) decodes the next
batches while the session runs; on Ray (``predict_ray``) tasks decode and actors run, and the driver writes.
Memory does not grow with the folder: rows are written, only counts are kept. Unreadable images are
counted and skipped; with the ImageFolder layout whose folders are the model's classes, the result
carries the top-1 accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data import DataError, images_given
from ..image_stream import decoded_batches, plan
from .inference import batch_sizes, label_index, open_artifact, ranked, row
from ..checks.serving import check_served, serving_choice, warn_if_trt_int8_on_a_cpu
from ..manifest import check_not_input, check_writable_dir
from ..preprocessing import Preprocessing
from ..progress import task
from ..runtime.batches import run_batches

log = logging.getLogger(__name__)

FORMATS = (".jsonl", ".csv")


@dataclass
class PredictResult:
    """What ``predict_folder`` wrote: images, skipped files, accuracy with labels, backend, and this run's rate."""

    output: Path
    predicted: int
    skipped: list[str] = field(default_factory=list)
    accuracy: float | None = None
    backend: str = "ort"
    resumed: int = 0  # rows taken over from an interrupted run
    images_per_second: float | None = None  # images predicted by this run / its wall time
    workers: int | None = None  # on Ray: the actors (processes) that ranked batches, counted from the rows
    verified: str = ""  # how the backend was verified to serve this artifact here (OpenVINO: serving.serving_choice)


def partial_path(output: Path) -> Path:
    """Where the rows go until the folder is done: ``OUT.partial`` beside ``OUT``."""
    return output.with_name(output.name + ".partial")


class Tally:
    """Counts rows and, once the number of classes is known, correct top-1 predictions by folder.

    Rows seen before that (resumed rows of a model without class names) are kept as counts per
    (folder, top-1) pair, so their memory is bounded by folders times classes, not by rows.
    """

    def __init__(self, root: Path, classes: list[str] | None, spec: Preprocessing):
        self.root, self.classes, self.spec = root, classes, spec
        self.rows, self.correct, self.index = 0, 0, None
        self.outputs = len(spec.class_names) if spec.class_names else 0
        self._pending: Counter[tuple[str, int]] = Counter()

    def add(self, path: str, top1: int, outputs: int = 0) -> None:
        self.rows += 1
        if not self.classes:  # not an ImageFolder: nothing to score
            return
        if outputs and not self.outputs:
            self.outputs = outputs
        if self.index is None and self.outputs:
            self.index = label_index(self.classes, self.spec, self.outputs) or {}
            for (folder, predicted), count in self._pending.items():
                self._count(folder, predicted, count)
            self._pending.clear()
        folder = Path(path).relative_to(self.root).parts[0]
        if self.index is None:
            self._pending[folder, top1] += 1
        else:
            self._count(folder, top1)

    def _count(self, folder: str, top1: int, count: int = 1) -> None:
        if self.index:
            self.correct += count * (self.index[folder] == top1)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.rows if self.index and self.rows else None


def predict_folder(artifact: str | Path, images: str | Path | list, output: str | Path, *, top_k: int = 5,
                   batch: int = 32, backend: str | None = None, ray_address: str | None = None,
                   workers: int = 2, resume: bool = False, allow_failed: bool = False) -> PredictResult:
    """Run ``artifact`` on every image under ``images`` (a folder, or a list of image files) and write the ``top_k``
    best classes to ``output``.

    Served = verified (``checks.serving.check_served``): an artifact whose manifest says it failed its gate is refused
    unless ``allow_failed``.

    ``output`` ends in .jsonl (one object per image: path, topk of index, class, score) or .csv
    (path, then index, class, score per rank). Rows stream to ``OUT.partial``, renamed to ``output``
    when done; ``resume`` continues an interrupted run from it (without ``resume`` an existing one is
    an error). With ``ray_address`` (``"local"``, ``"auto"`` or ``"ray://host:port"``) the job runs
    on Ray Data; the rows are the same.
    """
    artifact, output = Path(artifact), Path(output)
    sources = [images] if isinstance(images, (str, Path)) else list(images)
    suffix = output.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"output {output} must end in {' or '.join(FORMATS)}")
    if top_k < 1 or batch < 1:
        raise DataError("`top_k` and `batch` must be positive")
    check_writable_dir(output)
    partial = partial_path(output)
    check_not_input([output, partial], [artifact])
    if partial.exists() and not resume:
        raise DataError(f"{partial} is left from an interrupted run: pass `resume` to continue it, or delete it")
    root, paths, classes = images_given(sources)
    served = check_served(artifact, allow_failed)
    if artifact.suffix == ".onnx":
        warn_if_trt_int8_on_a_cpu(artifact)
    choice = serving_choice(artifact, backend)
    runner, spec, backend = open_artifact(artifact, choice.backend)
    tally = Tally(root, classes, spec)
    done = _read_partial(partial, suffix, top_k) if resume and partial.exists() else {}
    for path, top1 in done.items():
        tally.add(path, top1)
    todo = [p for p in paths if str(p) not in done]
    if done:
        log.info(f"resuming {partial.name}: {len(done)} images done, {len(todo)} to go")
    skipped: list[str] = []
    ran_on: set[int] = set()
    start = time.perf_counter()
    new = partial.stat().st_size == 0 if partial.exists() else True
    with open(partial, "a", newline="") as out:
        if new and suffix == ".csv":
            out.write(_csv_line(["path", *[f"{n}_{r}" for r in range(1, top_k + 1) for n in ("index", "class", "score")]]))
        if ray_address:
            from .predict_ray import rows_on_ray

            batches = rows_on_ray(artifact, backend, spec, todo, top_k, batch, ray_address, workers, ran_on)
        else:
            batches = _rows_locally(runner, spec, todo, top_k, batch)
        for rows, failures, outputs in batches:
            out.write("".join(_format(r, suffix) for r in rows))
            out.flush()
            for r in rows:
                tally.add(r["path"], r["topk"][0]["index"], outputs)
            skipped += failures
    elapsed = time.perf_counter() - start
    if not tally.rows:
        partial.unlink(missing_ok=True)
        raise DataError(f"no readable image among {len(paths)} files under {root}")
    if skipped:
        log.warning(f"skipped {len(skipped)} unreadable images of {len(paths)}: {', '.join(skipped[:5])}"
                    + (", ..." if len(skipped) > 5 else ""))
    os.replace(partial, output)
    predicted_now = tally.rows - len(done)
    rate = predicted_now / elapsed if predicted_now and elapsed > 0 else None
    verified = "; ".join(filter(None, [served, choice.verified]))
    return PredictResult(output, tally.rows, skipped, tally.accuracy, backend, len(done), rate,
                         len(ran_on) if ray_address else None, verified)


def _rows_locally(runner, spec: Preprocessing, paths: list[Path], top_k: int,
                  batch: int) -> Iterator[tuple[list[dict], list[str], int]]:
    """(rows, unreadable files, number of classes) batch by batch; the decoder pool works ahead (``image_stream``)."""
    names = spec.class_names
    batches = plan([batch] * -(-len(paths) // batch))
    with task(log, f"Predicting {len(paths)} images", len(paths)) as advance:
        for decoded in decoded_batches(paths, spec, batches):
            kept = [paths[i] for i in decoded.positions]
            rows, outputs = [], 0
            if kept:
                logits = run_batches(runner, decoded.array, batch_sizes(runner, len(kept), batch))
                outputs = logits.shape[1]
                indices, scores = ranked(logits, top_k)
                rows = [row(path, k, s, names) for path, k, s in zip(kept, indices, scores)]
            advance(len(kept) + len(decoded.failures))
            yield rows, [text for _, text in decoded.failures], outputs


def _csv_line(cells: list) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue()


def _format(r: dict, suffix: str) -> str:
    """One row as a JSONL line or a CSV line (path, then index, class, score per rank)."""
    if suffix == ".jsonl":
        return json.dumps(r) + "\n"
    cells = [r["path"]]
    for entry in r["topk"]:
        cells += [entry["index"], entry["class"] or "", f"{entry['score']:.6g}"]
    return _csv_line(cells)


def _read_partial(partial: Path, suffix: str, top_k: int) -> dict[str, int]:
    """The images an interrupted run wrote, with their top-1 index; a torn last line is cut off the file."""
    data = partial.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(partial, "r+b") as f:
            f.truncate(len(complete))
    lines = complete.decode().splitlines()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in lines if line]
        if rows and len(rows[0]["topk"]) != top_k:
            raise DataError(f"{partial} was written with another `top_k` ({len(rows[0]['topk'])}): delete it")
        return {r["path"]: r["topk"][0]["index"] for r in rows}
    rows = list(csv.reader(lines))
    if rows and (rows[0][0] != "path" or len(rows[0]) != 1 + 3 * top_k):
        raise DataError(f"{partial} was written with another `top_k` or is not this command's: delete it")
    return {cells[0]: int(cells[1]) for cells in rows[1:]}
