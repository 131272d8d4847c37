"""The stages composed: model -> folded model -> FP32 ONNX, verified against PyTorch, with manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .console import step, warn
from .data import Inputs, image_inputs, random_inputs
from .errors import GateFailed, ModelError, OnnxError, first_line
from .export import DEFAULT_OPSET, export_onnx, load_onnx, read_metadata
from .fold import FoldReport, fold_batchnorm, fold_onnx_batchnorm, to_inference_mode
from .manifest import atomic_output, check_writable_dir, sha256_file, write_manifest
from .models import LoadedModel, Preprocessing, run_forward
from .runners import OrtRunner, TorchRunner
from .verify import GATES, Verification, verify

#: Largest relative error (to max |logit|) the PyTorch-level fold may introduce.
FOLD_TOLERANCE = 1e-4


@dataclass
class OnnxResult:
    """What ``onnx_from_model`` produced."""

    path: Path
    fold: FoldReport
    onnx_fold: FoldReport
    fold_error: float
    verification: Verification | None


def verification_inputs(loaded: LoadedModel, images: str | Path | None, count: int = 8, seed: int = 0) -> Inputs:
    """Real images from ``images`` when given, else ``count`` seeded random inputs."""
    if images:
        return image_inputs(images, loaded.preprocessing)
    return random_inputs(loaded.preprocessing, count, seed)


def checked_fold(loaded: LoadedModel, seed: int = 0) -> tuple[torch.nn.Module, FoldReport, float]:
    """Fold BatchNorm and check the folded module against the original; returns the relative error."""
    example = torch.from_numpy(random_inputs(loaded.preprocessing, 2, seed).array)
    reference = run_forward(loaded.module, example)
    folded, report = fold_batchnorm(loaded.module)
    result = run_forward(folded, example)
    error = float((result - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    if not error <= FOLD_TOLERANCE:
        raise ModelError(f"BatchNorm folding changed the outputs (relative error {error:.3g} > {FOLD_TOLERANCE})")
    return folded, report, error


def onnx_from_model(
    loaded: LoadedModel,
    output: str | Path,
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
    inputs = verification_inputs(loaded, images, seed=seed) if run_verification else None
    with step(f"Folding BatchNorm in {loaded.name}"):
        folded, report, fold_error = checked_fold(loaded, seed)
    if report.unfoldable:
        warn("BatchNorm not folded in PyTorch: " + ", ".join(f"{n} ({r})" for n, r in report.unfoldable))
    with step(f"Exporting {output}"):
        onnx_report = export_onnx(folded, loaded.preprocessing, output, loaded.source, opset, batch)
    if onnx_report.unfoldable:
        warn("BatchNormalization left in the ONNX: " + ", ".join(f"{n} ({r})" for n, r in onnx_report.unfoldable))
    verification = None
    if inputs is not None:
        with step(f"Verifying against PyTorch on {inputs.description}"):
            verification = verify(TorchRunner(loaded.module), OrtRunner(output), inputs, GATES["fp32"], batch)
    write_manifest(
        output,
        stage="onnx",
        precision="fp32",
        source=loaded.source,
        settings={"opset": opset, "batch": batch or "dynamic", "input": "input", "output": "logits"},
        preprocessing=loaded.preprocessing.to_dict(),
        fold={**report.to_dict(), "max_rel_err": fold_error, "onnx_level": onnx_report.to_dict()},
        verification=verification.to_dict() if verification else None,
    )
    result = OnnxResult(output, report, onnx_report, fold_error, verification)
    if verification is not None and not verification.passed:
        raise GateFailed(f"{output} failed the FP32 gate: {'; '.join(verification.failures)} (artifact kept)")
    return result


@dataclass
class FoldOnnxResult:
    """What ``fold_onnx_file`` produced."""

    path: Path
    fold: FoldReport
    to_inference: int
    verification: Verification | None


def fold_onnx_file(source: str | Path, output: str | Path, run_verification: bool = True, seed: int = 0) -> FoldOnnxResult:
    """Fold ``Conv -> BatchNormalization`` in an ONNX file made elsewhere and verify it with ONNX Runtime.

    Training-mode BatchNormalization nodes are first switched to inference mode (running statistics);
    the reference for verification is the input in that inference form.
    """
    import onnx

    output = Path(output)
    check_writable_dir(output)
    model = load_onnx(source)
    switched = to_inference_mode(model)
    reference = model.SerializeToString()
    report = fold_onnx_batchnorm(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # checker and shape-inference errors
        raise OnnxError(f"the folded model fails onnx.checker: {first_line(exc)}") from exc
    with atomic_output(output) as tmp:
        onnx.save(model, str(tmp))
    verification = None
    if run_verification:
        inputs = random_inputs(_input_spec(model), 8, seed)
        with step(f"Verifying {output} against {source} on ONNX Runtime"):
            candidate = OrtRunner(output)
            reference_runner = OrtRunner(reference)
            verification = verify(reference_runner, candidate, inputs, GATES["fp32"], candidate.fixed_batch)
    write_manifest(
        output,
        stage="fold",
        precision="fp32",
        source={"onnx": str(source), "sha256": sha256_file(source)},
        fold={**report.to_dict(), "switched_to_inference": switched},
        verification=verification.to_dict() if verification else None,
    )
    if verification is not None and not verification.passed:
        raise GateFailed(f"{output} differs from {source}: {'; '.join(verification.failures)} (artifact kept)")
    return FoldOnnxResult(output, report, switched, verification)


def _input_spec(model) -> Preprocessing:
    """Input shape of a (possibly foreign) ONNX model: its metadata, else its static dims, else 224."""
    stored = read_metadata(model).get("preprocessing")
    if stored:
        return Preprocessing.from_dict(stored)
    initializers = {init.name for init in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in initializers)
    dims = [d.dim_value or None for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise OnnxError(f"input '{graph_input.name}' has {len(dims)} dims; expected (N, C, H, W)")
    channels, height, width = dims[1] or 3, dims[2] or 224, dims[3] or 224
    return Preprocessing((height, width), max(height, width), (0.0,) * channels, (1.0,) * channels, channels)
