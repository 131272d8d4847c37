"""Image files decoded in batches by a pool of decoder threads, ahead of the runner that consumes them.

The one decoder of the toolkit (``read_image``: Pillow, then the model's preprocessing) behind every reader
of image folders: verification, calibration, predict, the benchmark's agreement check. Batches are fixed by
position in the file list and grouped into blocks of ``BLOCK_IMAGES`` (``plan``), so the same files make the same
batches however they are run (locally, on Ray, resumed). Pillow releases the GIL while it decodes and resizes, so
threads decode in parallel; at most ``decoders + 1`` blocks are held at once, whatever the number of files. With
``decoders`` 0, each block is decoded in the runners' thread just before it runs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .preprocessing import Preprocessing

PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
#: Decoder threads: two at least (on two cores they measured 1.05x faster than decoding in the runners' thread:
#: benchmarks/verify_stream.py, resnet50 INT8 on a 2-core Xeon, 9.84 against 9.38 img/s), up to half the cores.
DECODERS = min(4, max(2, (os.cpu_count() or 1) // 2))
#: Images of one block: a verification runs the candidate on every batch of a block, then the reference. Two
#: runtimes taking turns batch by batch fight over the cores (ONNX Runtime's threads spin on after each run):
#: PyTorch ran a digits ResNet-18 at a fortieth of its speed between ONNX Runtime batches of 8, measured.
BLOCK_IMAGES = 64


def load_image(path: str | Path, spec: Preprocessing) -> np.ndarray:
    """Decode one image and preprocess it to ``(C, H, W)`` float32 (resize, center crop, normalise)."""
    from PIL import Image

    height, width = spec.input_size
    with Image.open(path) as image:
        image = image.convert(PIL_MODES.get(spec.channels, "RGB"))
        scale = max(spec.resize / min(image.size), height / image.height, width / image.width)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, _resample(spec.interpolation))
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != spec.channels:  # e.g. 2 or 5+ channels: repeat the luminance
        array = np.repeat(array.mean(axis=2, keepdims=True), spec.channels, axis=2)
    array = (array - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _resample(name: str):
    from PIL import Image

    return {"nearest": Image.NEAREST, "bicubic": Image.BICUBIC}.get(name, Image.BILINEAR)


def read_image(path: str | Path, spec: Preprocessing) -> tuple[np.ndarray | None, str | None]:
    """``load_image(path, spec)`` and None, or None and why (the error's type) for a file that cannot be decoded."""
    from PIL import UnidentifiedImageError

    try:
        return load_image(path, spec), None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return None, type(exc).__name__


@dataclass
class Decoded:
    """One block: its first position and planned batch sizes, the readable images' arrays and positions, and the
    others as ``(position, "folder/name (error)")``."""

    start: int
    sizes: tuple[int, ...]
    array: np.ndarray | None
    positions: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)


def plan(sizes: list[int], block: int = BLOCK_IMAGES) -> list[tuple[int, tuple[int, ...]]]:
    """Batches of ``sizes`` laid end to end, grouped into blocks of at least ``block`` images: ``(start, sizes)``."""
    blocks, start, current = [], 0, []
    for size in sizes:
        current.append(int(size))
        if sum(current) >= block:
            blocks.append((start, tuple(current)))
            start, current = start + sum(current), []
    if current:
        blocks.append((start, tuple(current)))
    return blocks


def decode_batch(paths: list[Path], spec: Preprocessing, start: int, sizes: tuple[int, ...]) -> Decoded:
    """Decode the files of the block at ``start`` (fewer at the end of the list)."""
    arrays, positions, failures = [], [], []
    for position in range(start, min(start + sum(sizes), len(paths))):
        path = Path(paths[position])
        array, error = read_image(path, spec)
        if error:
            failures.append((position, f"{path.parent.name}/{path.name} ({error})"))  # names repeat across classes
        else:
            arrays.append(array)
            positions.append(position)
    return Decoded(start, sizes, np.stack(arrays) if arrays else None, positions, failures)


def decoded_batches(paths: list[Path], spec: Preprocessing, blocks: list[tuple[int, tuple[int, ...]]],
                    decoders: int = DECODERS) -> Iterator[Decoded]:
    """The ``blocks`` (``plan``) of ``paths`` decoded, in order, by ``decoders`` threads working ahead (0: decoded
    here, one after the other)."""
    if decoders <= 0:
        for start, sizes in blocks:
            yield decode_batch(paths, spec, start, sizes)
        return
    with ThreadPoolExecutor(max_workers=decoders, thread_name_prefix="decode") as pool:
        pending = [pool.submit(decode_batch, paths, spec, *b) for b in blocks[:decoders + 1]]
        for i in range(len(blocks)):
            decoded = pending.pop(0).result()
            if i + decoders + 1 < len(blocks):
                pending.append(pool.submit(decode_batch, paths, spec, *blocks[i + decoders + 1]))
            yield decoded
