"""Inputs: image folders (ImageFolder layout gives labels), seeded random batches, preprocessing.

Images are preprocessed exactly as the :class:`~resnet_export.preprocessing.Preprocessing` stored with the
model says, so verification (and later calibration) sees what inference will see.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .progress import task
from .errors import ResnetExportError
from .preprocessing import Preprocessing


log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DataError(ResnetExportError):
    """An input folder or file cannot be used."""


@dataclass
class Batch:
    """One block of verification inputs (``image_stream.plan``): the rows' positions in their source, the array, and
    their labels."""

    start: int
    sizes: tuple[int, ...]  # the planned batches: a batch with fewer rows is padded when it runs
    positions: list[int]
    array: np.ndarray | None
    labels: np.ndarray | None
    failures: list[tuple[int, str]] = field(default_factory=list)  # unreadable files: (position, what)


class Labelled:
    """Rows with labels (one per row, or None) and whether they follow the sorted folder order."""

    labels: np.ndarray | None
    labels_by_order: bool

    def labels_for(self, num_classes: int) -> np.ndarray | None:
        """The labels, or None where they cannot be the classes of a ``num_classes`` model (sorted-order labels of
        another number of folders, or an index past the model's outputs)."""
        labels = self.labels
        if labels is None or not len(labels) or (self.labels_by_order and labels.max() + 1 != num_classes):
            return None
        return labels if labels.max() < num_classes else None


@dataclass
class Inputs(Labelled):
    """Preprocessed inputs ``(N, C, H, W)`` float32 held in memory, labels when known, and where they came from.

    ``labels_by_order`` marks labels taken from the sorted folder order (the ImageFolder convention),
    which only mean something for a model with exactly that many classes.
    """

    array: np.ndarray
    labels: np.ndarray | None
    description: str
    labels_by_order: bool = False

    def __len__(self) -> int:
        return len(self.array)

    def batches(self, blocks: list[tuple[int, tuple[int, ...]]]) -> Iterator[Batch]:
        """The rows of each ``(start, sizes)`` block (``image_stream.plan``)."""
        for start, sizes in blocks:
            end = start + sum(sizes)
            positions = list(range(start, min(end, len(self.array))))
            labels = None if self.labels is None else self.labels[start:end]
            yield Batch(start, sizes, positions, self.array[start:end], labels)

    def head(self, count: int) -> "Inputs":
        """The first ``count`` inputs (itself when it holds no more)."""
        if count >= len(self):
            return self
        return Inputs(self.array[:count], None if self.labels is None else self.labels[:count],
                      f"the first {count} of {self.description}", self.labels_by_order)


@dataclass
class ImageFolder(Labelled):
    """Images of a folder, decoded batch by batch as they are used (``image_stream``): memory does not grow with
    the number of images. Labels come from the ImageFolder layout when it has one (``class_indices``)."""

    root: Path
    paths: list[Path]
    spec: Preprocessing
    classes: list[str] | None  # the class folders of the ImageFolder layout
    labels: np.ndarray | None  # one per path, by its class folder
    labels_by_order: bool = False
    decoders: int | None = None  # decoder threads (None: image_stream.DECODERS; 0: decode in the runner's thread)

    @property
    def description(self) -> str:
        return f"{len(self.paths)} images from {self.root}"

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, blocks: list[tuple[int, tuple[int, ...]]]) -> Iterator[Batch]:
        """The readable images of each ``(start, sizes)`` block, decoded ahead by the pool."""
        from .image_stream import DECODERS, decoded_batches

        decoders = DECODERS if self.decoders is None else self.decoders
        for d in decoded_batches(self.paths, self.spec, blocks, decoders):
            labels = None if self.labels is None else self.labels[d.positions]
            yield Batch(d.start, d.sizes, d.positions, d.array, labels, d.failures)

    def head(self, count: int) -> Inputs:
        """The first ``count`` images, decoded into memory (the readable ones)."""
        inputs = labelled_inputs(self.root, self.paths[:count], self.spec, self.classes)
        if count < len(self):
            inputs.description = f"the first {len(inputs)} of {self.description}"
        return inputs

    def load(self) -> Inputs:
        """Every image decoded into memory (for the few images of a check, never a validation set)."""
        return labelled_inputs(self.root, self.paths, self.spec, self.classes)


def image_folder(directory: str | Path, spec: Preprocessing, decoders: int | None = None) -> ImageFolder:
    """The images of ``directory`` (``find_images``) to stream, labelled when it has the ImageFolder layout."""
    root = Path(directory)
    paths, classes = find_images(root)
    return ImageFolder(root, paths, spec, classes, *folder_labels(root, paths, classes, spec), decoders)


def folder_labels(root: Path, paths: list[Path], classes: list[str] | None,
                  spec: Preprocessing) -> tuple[np.ndarray | None, bool]:
    """Each path's label by its class folder under ``root`` (``class_indices``), and whether the sorted order gave
    them; None without the ImageFolder layout."""
    if not classes:
        return None, False
    index, by_order = class_indices(classes, spec.class_names)
    return np.array([index[p.relative_to(root).parts[0]] for p in paths]), by_order


def find_images(directory: str | Path) -> tuple[list[Path], list[str] | None]:
    """Image files under ``directory`` (recursive, sorted) and, for the ImageFolder layout, class names.

    The layout counts as ImageFolder when every image lies one level down, in a folder named after
    its class.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    paths = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}: "
                        + (f"{len(files)} files, none with an image suffix" if files else "the folder is empty"))
    depths = {len(p.relative_to(root).parts) for p in paths}
    classes = sorted({p.relative_to(root).parts[0] for p in paths}) if depths == {2} else None
    return paths, classes


def images_given(sources: list[str | Path]) -> tuple[Path, list[Path], list[str] | None]:
    """A folder (``find_images``), one image file or several: the folder (or the files' common folder), the images,
    and the ImageFolder classes (a folder's only)."""
    sources = [Path(s) for s in sources]
    if len(sources) == 1 and sources[0].is_dir():
        return sources[0], *find_images(sources[0])
    for path in sources:
        if path.is_dir():
            raise DataError(f"{path} is a folder: give one folder, or image files")
        if not path.is_file():
            raise DataError(f"image {path} does not exist")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{path} is not an image ({', '.join(IMAGE_SUFFIXES)})")
    import os

    return Path(os.path.commonpath([p.resolve().parent for p in sources])), sources, None


def class_indices(classes: list[str], class_names: list[str] | None) -> tuple[dict[str, int], bool]:
    """Map folder names to output indices: by the model's class names, by number, else sorted order.

    The flag says whether the sorted order was used.
    """
    if class_names and all(c in class_names for c in classes):
        return {c: class_names.index(c) for c in classes}, False
    if all(c.isdigit() for c in classes):
        return {c: int(c) for c in classes}, False
    return {c: i for i, c in enumerate(classes)}, True


def decode_images(paths: list[Path], spec: Preprocessing, what: str = "Decoding images") -> tuple[np.ndarray, list[Path]]:
    """Decode and preprocess ``paths`` with a progress bar (``image_stream``'s pool); unreadable files are skipped
    with a warning.

    Returns the ``(N, C, H, W)`` array and the paths that were kept. Raises when none is readable.
    """
    from .image_stream import BLOCK_IMAGES, decoded_batches, plan

    arrays, kept, failures = [], [], []
    with task(log, what, len(paths), done=False) as advance:
        for d in decoded_batches(paths, spec, plan([BLOCK_IMAGES] * -(-len(paths) // BLOCK_IMAGES))):
            if d.array is not None:
                arrays.append(d.array)
            kept += [paths[i] for i in d.positions]
            failures += [text for _, text in d.failures]
            advance(len(d.positions) + len(d.failures))
    if not kept:
        raise DataError(
            f"no readable image among {len(paths)} files: {len(failures)} skipped, cannot be decoded: "
            + ", ".join(failures[:3]) + (", ..." if len(failures) > 3 else "")
        )
    warn_skipped(failures, len(paths))
    return np.concatenate(arrays), kept


def warn_skipped(failures: list[str], total: int) -> None:
    """One warning naming the first unreadable files, when there are any."""
    if failures:
        log.warning(f"skipped {len(failures)} unreadable images of {total}: " + ", ".join(failures[:3])
                    + (", ..." if len(failures) > 3 else ""))


def labelled_inputs(root: Path, paths: list[Path], spec: Preprocessing, classes: list[str] | None,
                    what: str = "Decoding images") -> Inputs:
    """Decode ``paths`` (images under ``root``) into Inputs, labelled when ``classes`` is known."""
    array, kept = decode_images(paths, spec, what)
    labels, by_order = folder_labels(root, kept, classes, spec)
    return Inputs(array, labels, f"{len(kept)} images from {root}", by_order)


def image_inputs(directory: str | Path, spec: Preprocessing, limit: int | None = None) -> Inputs:
    """Load (up to ``limit``) images of a folder, with labels when it has the ImageFolder layout."""
    paths, classes = find_images(directory)
    return labelled_inputs(Path(directory), paths[:limit] if limit else paths, spec, classes)


#: Without verification images of its own, at least this share of the calibration data is held out.
HELD_OUT_SHARE = 0.2
#: Fewer held-out samples than this give coarse figures (one sample moves agreement by over 2%).
FEW_HELD_OUT = 50


def split_counts(total: int, size: int, held_out_limit: int) -> tuple[int, int]:
    """How many of ``total`` samples calibrate and how many are held out for verification.

    With ``held_out_limit`` 0 (verification data given elsewhere) all may calibrate. Otherwise at least
    ``HELD_OUT_SHARE`` of them (one at least) is held out, so verification never sees a calibration sample.
    """
    if not held_out_limit:
        return min(size, total), 0
    if total < 2:
        raise DataError(f"{total} calibration sample: at least 2 are needed to hold one out for verification; "
                        "pass `val`")
    calibrate = min(size, total - max(1, math.ceil(total * HELD_OUT_SHARE)))
    return calibrate, min(total - calibrate, held_out_limit)


def held_out_description(count: int, what: str) -> str:
    """``N held-out WHAT``, saying so when N is too few for precise figures."""
    text = f"{count} held-out {what}"
    return text + (f" (only {count}: pass `val` for precise figures)" if count < FEW_HELD_OUT else "")


def calibration_split(
    directory: str | Path, spec: Preprocessing, size: int, seed: int = 0, held_out_limit: int = 500
) -> tuple[Inputs, Inputs | None]:
    """Pick up to ``size`` images of ``directory`` for calibration (seeded) and hold others out for checks.

    Only the chosen images are decoded: the calibration images and up to ``held_out_limit`` held out
    (``split_counts``). A folder too small for ``size`` plus the held-out share calibrates on fewer, with a warning.
    """
    root = Path(directory)
    paths, classes = find_images(root)
    calibrate, held = split_counts(len(paths), size, held_out_limit)
    order = np.random.default_rng(seed).permutation(len(paths))
    if calibrate < size:  # what the summary line counts; a default larger than the folder is no fault
        log.info(f"{root} has {len(paths)} images, fewer than `calib_size` {size}"
                    + (f" and a held-out share: calibrating on {calibrate}, verifying on {held}" if held else
                       f": calibrating on all of them"))
    chosen = [paths[i] for i in sorted(order[:calibrate])]
    rest = [paths[i] for i in sorted(order[calibrate:calibrate + held])]
    calib = labelled_inputs(root, chosen, spec, classes, "Decoding calibration images")
    held_out = None
    if rest:
        held_out = labelled_inputs(root, rest, spec, classes, "Decoding held-out images")
        held_out.description = held_out_description(len(held_out.array), f"images from {root}")
    return calib, held_out


def array_inputs(path: str | Path, spec: Preprocessing) -> Inputs:
    """Already preprocessed inputs from a ``.npy`` file or the first array of a ``.npz`` file."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        array = loaded[loaded.files[0]] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"cannot read arrays from {path} ({exc})") from exc
    expected = (spec.channels, *spec.input_size)
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        raise DataError(f"{path} holds an array of shape {list(array.shape)}; expected [N, {', '.join(map(str, expected))}]")
    return Inputs(array.astype(np.float32), None, f"{len(array)} arrays from {path.name}")


def random_inputs(spec: Preprocessing, count: int = 8, seed: int = 0) -> Inputs:
    """``count`` seeded standard-normal inputs (the statistics of normalised images)."""
    rng = np.random.default_rng(seed)
    array = rng.standard_normal((count, spec.channels, *spec.input_size), dtype=np.float32)
    return Inputs(array, None, f"{count} seeded random inputs (seed {seed})")


def verification_inputs(spec: Preprocessing, images: str | Path | None, count: int = 8,
                        seed: int = 0) -> Inputs | ImageFolder:
    """Real images from ``images`` when given (streamed), else ``count`` seeded random inputs, made as ``spec`` says."""
    if images:
        return image_folder(images, spec)
    return random_inputs(spec, count, seed)


def check_calibration_source(calib: str | Path) -> None:
    """Raise DataError, naming what was given, unless ``calib`` is an image folder with images, a .npy or a .npz."""
    calib = Path(calib)
    if calib.is_file() and calib.suffix in (".npy", ".npz"):
        return
    if calib.is_file():
        kind = "an image" if calib.suffix.lower() in IMAGE_SUFFIXES else f"a {calib.suffix or 'suffix-less'} file"
        raise DataError(f"calibration data {calib} is {kind}: give the folder of images that holds it (searched "
                        "recursively), or a .npy/.npz of preprocessed inputs")
    if not calib.is_dir():
        raise DataError(f"calibration data {calib} does not exist (an image folder, .npy or .npz)")
    find_images(calib)


def calibration_data(calib: str | Path, spec: Preprocessing, size: int, seed: int,
                     held_out: bool = True) -> tuple[Inputs, Inputs | None]:
    """Calibration inputs and, when ``held_out``, the held-out rest, from an image folder or a ``.npy``/``.npz``.

    With ``held_out`` the two never share a sample (``split_counts``).
    """
    calib = Path(calib)
    limit = 500 if held_out else 0
    if calib.is_file() and calib.suffix in (".npy", ".npz"):
        arrays = array_inputs(calib, spec)
        calibrate, held = split_counts(len(arrays.array), size, limit)
        if calibrate < size:  # as for a folder: what the summary line counts, no fault
            log.info(f"{calib} has {len(arrays.array)} arrays, fewer than `calib_size` {size}: "
                        f"calibrating on {calibrate}" + (f", verifying on {held}" if held else ""))
        head, rest = arrays.array[:calibrate], arrays.array[calibrate:calibrate + held]
        kept = Inputs(rest, None, held_out_description(len(rest), f"arrays from {calib.name}")) if held else None
        return Inputs(head, None, f"{len(head)} arrays from {calib.name}"), kept
    if not calib.is_dir():  # a folder is listed once, by the split (the request checked it when made)
        check_calibration_source(calib)
    return calibration_split(calib, spec, size, seed, held_out_limit=limit)
