"""The reference an ONNX was verified against, carried inside the ONNX itself (``metadata_props``).

A plan built from an ONNX, on another machine, must be checked against what the ONNX stands for: PyTorch FP32,
not the same ONNX replayed on ONNX Runtime. So every ONNX the toolkit verifies carries some of its verification
inputs and the reference's logits on exactly those inputs, within ``BUDGET`` bytes (two inputs at least, so that a
plan's rows can be told apart: ``verify.compare``'s centered cosine): it travels with the file,
however the file is copied. Inputs decoded from images are stored as their 8-bit pixel codes when those rebuild
the inputs bit for bit (``image_stream.load_image``'s arithmetic); any other input as float16, with the logits computed
on those float16 values, so inputs and logits always agree exactly.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import ImageFolder, Inputs
from ..errors import ResnetExportError
from ..preprocessing import Preprocessing
from ..runtime.batches import batch_plan, run_batches

log = logging.getLogger(__name__)

KEY = "reference"  # the metadata key (under the toolkit's prefix)
BUDGET = 512 * 1024  # bytes of the compressed record, at most
MAX_SAMPLES = 64
MIN_SAMPLES = 2  # whatever the budget: one input repeated cannot show a plan answering rows with other rows
PYTORCH = "PyTorch FP32"


class RecordError(ResnetExportError):
    """A record whose origin would make it prove nothing: not what it says it is, or the artifact's own outputs."""


@dataclass
class Record:
    """Inputs and the reference's logits on them, what made the logits, and when."""

    inputs: np.ndarray  # (N, C, H, W) float32
    logits: np.ndarray  # (N, classes) float32
    labels: np.ndarray | None
    source: str  # "PyTorch FP32", or what stood for it
    stage: str  # the command that recorded it: "export", "quantize"
    description: str  # where the inputs came from

    def summary(self) -> str:
        """``PyTorch FP32 logits recorded at quantize time on 16 held-out calibration images``."""
        return f"{self.source} logits recorded at {self.stage} time on {self.description}"

    def as_inputs(self) -> Inputs:
        """The recorded inputs as verification inputs."""
        return Inputs(self.inputs, self.labels, f"{len(self.inputs)} inputs recorded at {self.stage} time")


def from_codes(codes: np.ndarray, mean, std) -> np.ndarray:
    """Inputs from 8-bit pixel codes, with ``image_stream.load_image``'s float32 arithmetic (code / 255, less mean, over std)."""
    mean = np.asarray(mean, np.float32)[None, :, None, None]
    std = np.asarray(std, np.float32)[None, :, None, None]
    return (codes.astype(np.float32) / 255.0 - mean) / std


def pixel_codes(array: np.ndarray, spec: Preprocessing) -> np.ndarray | None:
    """The uint8 codes ``array`` was made from by ``load_image``, or None when no codes rebuild it bit for bit
    (random inputs, a .npy, luminance averaged over channels)."""
    if len(spec.mean) != array.shape[1] or len(spec.std) != array.shape[1]:
        return None
    mean = np.asarray(spec.mean, np.float64)[None, :, None, None]
    std = np.asarray(spec.std, np.float64)[None, :, None, None]
    codes = np.rint((array.astype(np.float64) * std + mean) * 255.0)
    if codes.min() < 0 or codes.max() > 255:
        return None
    codes = codes.astype(np.uint8)
    return codes if np.array_equal(from_codes(codes, spec.mean, spec.std), array) else None


def _packed(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def make_record(inputs: "Inputs | ImageFolder", reference, spec: Preprocessing, source: str, stage: str) -> dict:
    """The metadata value recording ``reference``'s logits on the first inputs that fit ``BUDGET``.

    ``reference`` is a Runner (it computes the logits on exactly the stored inputs); its name is kept as
    ``made_by``, and a record that says it is PyTorch's must have been computed by PyTorch (a replay of the ONNX on
    ONNX Runtime would hold a plan to the ONNX, not to what the ONNX stands for). Returns a JSON-able dict: the
    compressed arrays in base64 and what they are.
    """
    made_by = getattr(reference, "name", type(reference).__name__)
    if source == PYTORCH and not made_by.startswith("torch"):
        raise RecordError(f"a reference recorded as {PYTORCH}'s was computed by {made_by}: it would hold later "
                          "artifacts to that, not to PyTorch")
    inputs = inputs.head(MAX_SAMPLES)  # an image folder's first images, decoded
    count = min(MAX_SAMPLES, len(inputs.array))
    least = min(MIN_SAMPLES, count)
    while True:
        array = np.ascontiguousarray(inputs.array[:count], dtype=np.float32)
        codes = pixel_codes(array, spec)
        stored = {"codes": codes} if codes is not None else {"inputs": array.astype(np.float16)}
        values = from_codes(codes, spec.mean, spec.std) if codes is not None else stored["inputs"].astype(np.float32)
        sizes = batch_plan(len(values), getattr(reference, "fixed_batch", None))
        stored["logits"] = np.asarray(run_batches(reference, values, sizes), np.float32)
        labels = inputs.labels_for(stored["logits"].shape[1])
        if labels is not None:
            stored["labels"] = labels[:count]
        blob = _packed(stored)
        if len(blob) <= BUDGET or count == least:
            break
        count = max(least, int(count * BUDGET / len(blob) * 0.95))
    log.info(f"reference recorded in the ONNX: {count} inputs ({'8-bit pixel codes' if codes is not None else 'float16'}"
             f"), {len(blob) / 1024:.0f} kB")
    described = inputs.description if count == len(inputs.array) else f"the first {count} of {inputs.description}"
    return {"data": base64.b64encode(blob).decode("ascii"), "form": "codes" if codes is not None else "float16",
            "samples": count, "source": source, "stage": stage, "inputs": described, "made_by": made_by,
            "mean": list(spec.mean), "std": list(spec.std)}


def read_record(path_or_model) -> Record | None:
    """The reference recorded in an ONNX file or model, or None when it carries none."""
    from ..onnx_graph import read_metadata

    meta = read_metadata(path_or_model).get(KEY)
    if not meta:
        return None
    with np.load(io.BytesIO(base64.b64decode(meta["data"]))) as arrays:
        if meta["form"] == "codes":
            inputs = from_codes(arrays["codes"], meta["mean"], meta["std"])
        else:
            inputs = arrays["inputs"].astype(np.float32)
        labels = arrays["labels"] if "labels" in arrays.files else None
        return Record(np.ascontiguousarray(inputs), arrays["logits"], labels, meta["source"], meta["stage"],
                      meta["inputs"])


def attach(path: str | Path, record: dict) -> None:
    """Store ``record`` (``make_record``) in the ONNX at ``path``, rewriting it atomically (an artifact the caller
    is making, never an input). A record computed from that same file is refused: an artifact judged against its
    own outputs passes whatever it computes."""
    import onnx

    if record.get("made_by") == f"ort:{Path(path).name}":
        raise RecordError(f"the reference to record in {path} was computed by {path} itself: it would prove nothing")

    from ..manifest import atomic_output
    from ..onnx_graph import load_onnx, set_metadata

    model = load_onnx(path)
    set_metadata(model, {KEY: record})
    with atomic_output(Path(path)) as tmp:
        onnx.save(model, str(tmp))
