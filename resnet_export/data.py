"""Inputs: image folders (ImageFolder layout gives labels), seeded random batches, preprocessing.

Images are preprocessed exactly as the :class:`~resnet_export.models.Preprocessing` stored with the
model says, so verification (and later calibration) sees what inference will see.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ResnetExportError
from .models import Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class DataError(ResnetExportError):
    """An input folder or file cannot be used."""


@dataclass
class Inputs:
    """Preprocessed inputs ``(N, C, H, W)`` float32, labels when known, and where they came from.

    ``labels_by_order`` marks labels taken from the sorted folder order (the ImageFolder convention),
    which only mean something for a model with exactly that many classes.
    """

    array: np.ndarray
    labels: np.ndarray | None
    description: str
    labels_by_order: bool = False

    def labels_for(self, num_classes: int) -> np.ndarray | None:
        """The labels, or None where they cannot be the classes of a ``num_classes`` model."""
        if self.labels is None or (self.labels_by_order and self.labels.max() + 1 != num_classes):
            return None
        return self.labels if self.labels.max() < num_classes else None


def find_images(directory: str | Path) -> tuple[list[Path], list[str] | None]:
    """Image files under ``directory`` (recursive, sorted) and, for the ImageFolder layout, class names.

    The layout counts as ImageFolder when every image lies one level down, in a folder named after
    its class.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    depths = {len(p.relative_to(root).parts) for p in paths}
    classes = sorted({p.relative_to(root).parts[0] for p in paths}) if depths == {2} else None
    return paths, classes


def class_indices(classes: list[str], class_names: list[str] | None) -> tuple[dict[str, int], bool]:
    """Map folder names to output indices: by the model's class names, by number, else sorted order.

    The flag says whether the sorted order was used.
    """
    if class_names and all(c in class_names for c in classes):
        return {c: class_names.index(c) for c in classes}, False
    if all(c.isdigit() for c in classes):
        return {c: int(c) for c in classes}, False
    return {c: i for i, c in enumerate(classes)}, True


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


def image_inputs(directory: str | Path, spec: Preprocessing, limit: int | None = None) -> Inputs:
    """Load (up to ``limit``) images of a folder, with labels when it has the ImageFolder layout."""
    paths, classes = find_images(directory)
    paths = paths[:limit] if limit else paths
    array = np.stack([load_image(p, spec) for p in paths])
    labels, by_order = None, False
    if classes:
        index, by_order = class_indices(classes, spec.class_names)
        labels = np.array([index[p.relative_to(directory).parts[0]] for p in paths])
    return Inputs(array, labels, f"{len(paths)} images from {directory}", by_order)


def random_inputs(spec: Preprocessing, count: int = 8, seed: int = 0) -> Inputs:
    """``count`` seeded standard-normal inputs (the statistics of normalised images)."""
    rng = np.random.default_rng(seed)
    array = rng.standard_normal((count, spec.channels, *spec.input_size), dtype=np.float32)
    return Inputs(array, None, f"{count} seeded random inputs (seed {seed})")
