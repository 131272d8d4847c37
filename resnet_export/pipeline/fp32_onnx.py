"""model -> folded model -> FP32 ONNX (``onnx_from_model``), and a foreign ONNX folded (``fold_onnx_file``), each
verified and given its manifest."""

from __future__ import annotations
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
import numpy as np
from ..progress import task
from ..data import random_inputs, verification_inputs
from ..errors import OnnxError, first_line
from ..source.export import DEFAULT_OPSET, export_onnx
from ..source.fold import FoldReport, checked_fold, fold_onnx_batchnorm, to_inference_mode
from ..manifest import atomic_output, check_not_input, check_writable_dir, sha256_file, write_manifest
from ..source.models import LoadedModel, model_files
from ..onnx_graph import input_spec, load_onnx, onnx_opset, onnx_preprocessing, read_metadata, set_metadata
from ..preprocessing import Preprocessing, stated
from ..runtime.runners import OrtRunner, Runner, TorchRunner
from ..checks.reference_record import PYTORCH, attach, make_record
from ..checks.verify import GATES, Gate, Verification, verify

log = logging.getLogger(__name__)


@dataclass
class OnnxResult:
    """What ``onnx_from_model`` produced."""

    path: Path
    fold: FoldReport
    onnx_fold: FoldReport
    fold_error: float
    verification: Verification | None


def onnx_from_model(
    loaded: LoadedModel,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    images: str | Path | None = None,
    run_verification: bool = True,
    seed: int = 0,
) -> OnnxResult:
    """Fold, export, verify against the original PyTorch model and write ``OUTPUT.json``.

    Raises GateFailed (after writing the artifact and its manifest) when verification misses the
    FP32 gate.
    """
    output = Path(output)
    check_writable_dir(output)
    check_not_input([output], model_files(loaded))
    inputs = verification_inputs(loaded.preprocessing, images, seed=seed) if run_verification else None
    with task(log, f"Folding BatchNorm in {loaded.name}"):
        folded, report, fold_error = checked_fold(loaded, seed)
    if report.unfoldable:
        log.warning("BatchNorm not folded in PyTorch: " + ", ".join(f"{n} ({r})" for n, r in report.unfoldable))
    with task(log, f"Exporting {output}"):
        onnx_report = export_onnx(folded, loaded.preprocessing, output, loaded.source, opset, batch)
    if onnx_report.unfoldable:
        log.warning("BatchNormalization left in the ONNX: " + ", ".join(f"{n} ({r})" for n, r in onnx_report.unfoldable))
    verification = None
    if inputs is not None:
        with task(log, f"Verifying against PyTorch on {inputs.description}"):
            verification = verify(TorchRunner(loaded.module), OrtRunner(output), inputs, GATES["fp32"], batch,
                                  described_reference=PYTORCH)
        attach(output, make_record(inputs, TorchRunner(loaded.module), loaded.preprocessing, PYTORCH, "export"))
    write_manifest(
        output,
        stage="onnx",
        precision="fp32",
        source=loaded.source,
        settings={"opset": onnx_opset(output), "batch": batch or "dynamic", "input": "input", "output": "logits"},
        preprocessing=loaded.preprocessing.to_dict(),
        fold={**report.to_dict(), "max_rel_err": fold_error, "onnx_level": onnx_report.to_dict()},
        verification=verification.to_dict() if verification else None,
    )
    result = OnnxResult(output, report, onnx_report, fold_error, verification)
    if verification is not None:
        verification.raise_if_failed(f"{output} failed the FP32 gate", " (artifact kept)")
    return result


@dataclass
class FoldOnnxResult:
    """What ``fold_onnx_file`` produced."""

    path: Path
    fold: FoldReport
    to_inference: int
    verification: Verification | None
    preprocessing: Preprocessing


def fold_onnx_file(source: str | Path, output: str | Path, *, run_verification: bool = True,
                   seed: int = 0, preprocessing: Preprocessing | None = None) -> FoldOnnxResult:
    """Fold ``Conv -> BatchNormalization`` in an ONNX file made elsewhere and verify it with ONNX Runtime.

    Training-mode BatchNormalization nodes are first switched to inference mode (running statistics);
    the reference for verification is the input in that inference form. ``preprocessing`` (from
    ``foreign_preprocessing``) is stored in the output, so later stages preprocess as stated.
    """
    import onnx

    output = Path(output)
    check_writable_dir(output)
    check_not_input([output], [source])
    model = load_onnx(source)
    switched = to_inference_mode(model)
    reference = model.SerializeToString()
    report = fold_onnx_batchnorm(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # checker and shape-inference errors
        raise OnnxError(f"the folded model fails onnx.checker: {first_line(exc)}") from exc
    if preprocessing:
        set_metadata(model, {"preprocessing": preprocessing.to_dict()})
    spec = input_spec(model)
    with atomic_output(output) as tmp:
        onnx.save(model, str(tmp))
    verification = None
    if run_verification:
        inputs = random_inputs(spec, 8, seed)
        with task(log, f"Verifying {output} against {source} on ONNX Runtime"):
            candidate = OrtRunner(output)
            reference_runner = OrtRunner(reference)
            described = f"{Path(source).name} (inference mode) on ONNX Runtime"
            verification = verify(reference_runner, candidate, inputs, GATES["fp32"], candidate.fixed_batch,
                                  described_reference=described)
        attach(output, make_record(inputs, reference_runner, spec, described, "fold"))
    write_manifest(
        output,
        stage="fold",
        precision="fp32",
        source={"onnx": str(source), "sha256": sha256_file(source)},
        fold={**report.to_dict(), "switched_to_inference": switched},
        preprocessing=spec.to_dict(),
        verification=verification.to_dict() if verification else None,
    )
    if verification is not None:
        verification.raise_if_failed(f"{output} differs from {source}", " (artifact kept)")
    return FoldOnnxResult(output, report, switched, verification, spec)


def foreign_preprocessing(source: str | Path, options: dict) -> Preprocessing | None:
    """The preprocessing ``options`` (``preprocessing.stated`` keywords) state for ``source``, an ONNX made
    elsewhere; None when none is stated. An ONNX that carries the toolkit's preprocessing keeps it."""
    if not options:
        return None
    carried = read_metadata(source).get("preprocessing")
    if carried:
        raise OnnxError(f"{source} carries its preprocessing ({Preprocessing.from_dict(carried).describe()}): "
                        "`resize`, `interpolation`, `mean` and `std` state it for an ONNX made elsewhere")
    return stated(onnx_preprocessing(source), **options)
