"""``verify`` on a Ray cluster: actors decode and score fixed blocks of the folder; the driver merges them.

Each item of the dataset is one block of the local run's plan (``image_stream.plan``: by position in the file
list), so every actor runs the reference and the candidate on exactly the batches the local run would, and sends
back the per-image results as the local run writes them (``checks.results.lines``, floats as their exact repr).
The driver merges them by position: the figures are those of the local run on the same images, to the last digit.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Iterator

import numpy as np

from ..data import Batch, ImageFolder
from ..image_stream import decode_batch
from ..ray_cluster import ray_data
from .results import Scored, from_lines, lines

log = logging.getLogger(__name__)


class Score:
    """Ray actor: the reference and the candidate (and the exact run), scoring the blocks it is given."""

    def __init__(self, make_runners: Callable, folder: ImageFolder):
        self.reference, self.candidate, self.exact = make_runners()
        self.folder = folder

    def __call__(self, items: dict) -> dict:
        from .verify import score_batch

        out = []
        for start, sizes in zip(items["start"], items["sizes"]):
            decoded = decode_batch(self.folder.paths, self.folder.spec, int(start), tuple(json.loads(sizes)))
            labels = None if self.folder.labels is None else self.folder.labels[decoded.positions]
            batch = Batch(decoded.start, decoded.sizes, decoded.positions, decoded.array, labels, decoded.failures)
            out.append(lines(score_batch(self.reference, self.candidate, batch, self.exact), self.folder.paths))
        return {"start": items["start"], "lines": np.array(out, dtype=object),
                "worker": np.full(len(out), os.getpid())}


def scorer_on_ray(folder: ImageFolder, make_runners: Callable, address: str, workers: int,
                  ran_on: set[int] | None = None) -> Callable[[list[tuple[int, tuple[int, ...]]]], Iterator[Scored]]:
    """A ``verify`` scorer running ``make_runners()`` (reference, candidate, exact or None) on ``workers`` Ray actors
    (``address``: local, auto, ray://...); ``ran_on`` collects the actors' process ids."""

    def scored(blocks: list[tuple[int, tuple[int, ...]]]) -> Iterator[Scored]:
        if not blocks:
            return
        with ray_data(address) as ray:
            from ray.data import ActorPoolStrategy

            log.info(f"scoring {len(blocks)} blocks on Ray ({workers} workers)")
            dataset = ray.data.from_items([{"start": start, "sizes": json.dumps(sizes)} for start, sizes in blocks])
            results = dataset.map_batches(Score, fn_constructor_kwargs={"make_runners": make_runners,
                                                                        "folder": folder},
                                          compute=ActorPoolStrategy(size=workers), batch_size=1,
                                          batch_format="numpy")
            for item in results.iter_batches(batch_size=1, batch_format="numpy"):
                if ran_on is not None:
                    ran_on.update(int(pid) for pid in item["worker"])
                for text in item["lines"]:
                    yield from_lines([json.loads(line) for line in text.splitlines()])

    return scored
