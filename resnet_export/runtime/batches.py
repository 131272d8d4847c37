"""Inputs run through a runner in batches: which batch sizes cover a count, and the run itself."""

from __future__ import annotations

import numpy as np

from .runners import Runner


def batch_plan(count: int, fixed_batch: int | None, max_batch: int = 8, min_batch: int = 1) -> list[int]:
    """Batch sizes covering ``count`` samples: ``min_batch`` first, then batches up to ``max_batch``.

    Two samples run as one batch of 2. Every batch after the first has at least 2 rows (the dynamic
    axis) and none leaves ``[min_batch, max_batch]``: a short last batch is padded (run_batches
    repeats its last sample). A model with a fixed batch runs batches of exactly that size.
    """
    if fixed_batch:
        return [fixed_batch] * -(-count // fixed_batch)
    if min_batch == max_batch:
        return [max_batch] * -(-count // max_batch)
    if count <= 2 and min_batch == 1:
        return [count]
    rest = max(count - min_batch, 0)
    sizes = [min_batch] + [max_batch] * (rest // max_batch)
    if rest % max_batch:
        sizes.append(max(rest % max_batch, min_batch, 2))
    return sizes


def run_batches(runner: Runner, array: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Run ``array`` through ``runner`` in batches of ``sizes``; pads a short last batch by repetition."""
    outputs, start = [], 0
    for size in sizes:
        if start >= len(array):
            break
        chunk = array[start:start + size]
        real = len(chunk)
        if real < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
        outputs.append(runner.infer(chunk)[:real])
        start += real
    return np.concatenate(outputs)
