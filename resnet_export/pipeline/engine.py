"""ONNX -> TensorRT plan, verified at its profile's batches (``engine_from_onnx``), and the whole of
``resnet-export trt`` (``trt_from_source``)."""

from __future__ import annotations
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
import numpy as np
from ..data import Inputs, random_inputs, verification_inputs
from ..manifest import check_not_input, check_writable_dir, write_manifest
from ..source.models import LoadedModel, model_files
from ..onnx_graph import onnx_preprocessing
from ..quantize.precision import PrecisionError
from ..runtime.runners import Runner, TorchRunner
from ..checks.reference_record import PYTORCH
from ..engine.build import BatchProfile, BuildOptions, EngineBuild, build_engine
from ..engine.tensorrt import TensorRTUnavailable, unavailable_reason
from ..engine.runner import TrtRunner
from ..checks.verify import Verification, plan_gate, verify
from .artifact import _plan_checks, recorded_reference
from .fp32_onnx import OnnxResult, onnx_from_model
from .outputs import side_onnx_path
from .precision import PrecisionRequest, PrecisionResult, precision_from_onnx


@dataclass
class EngineResult:
    """What ``engine_from_onnx`` produced."""

    path: Path
    record: EngineBuild
    verification: Verification


def engine_from_onnx(onnx_path: str | Path, output: str | Path, *, profile: BatchProfile = BatchProfile(),
                     options: BuildOptions | None = None, reference: Runner | None = None,
                     inputs: Inputs | None = None, seed: int = 0) -> EngineResult:
    """Build the engine, verify it at its profile's smallest, tuned and largest batch, and write ``output.json``.

    ``reference`` is PyTorch when the caller has the model (``inputs`` then defaults to seeded random ones).
    Without it the plan is gated against what its ONNX stands for: the logits the ONNX carries from its own
    verification (``reference_record``), else, when it carries none, the ONNX itself on ONNX Runtime; the
    verification says which. The gate follows the precision and whether the weights are random
    (``plan_gate``); a real engine rounds differently, so one input's top-1 flip is allowed, never a fidelity
    miss. The runner checks the fresh build record, not a sidecar an earlier build left.
    """
    check_not_input([output], [onnx_path])
    options = options or BuildOptions()
    record = build_engine(onnx_path, output, profile, options)
    precision = record.precision.get("dtype", "fp32")
    engine = TrtRunner(output, manifest=record.to_dict())
    if reference is not None:
        inputs = inputs or random_inputs(onnx_preprocessing(onnx_path), max(8, engine.profile_max_batch), seed)
        expected, described = reference, f"{PYTORCH} on {inputs.description}"
    else:
        inputs, expected, described = recorded_reference(onnx_path, max(8, engine.profile_max_batch), seed)
    gate, sizes = _plan_checks(engine, precision, onnx_path, options.tf32)
    verification = verify(expected, engine, inputs, gate, sizes=sizes, cover=True, described_reference=described,
                          slack=1)
    write_manifest(output, stage="engine", **record.to_dict(), verification=verification.to_dict())
    verification.raise_if_failed(f"{output} failed the {precision.upper()} gate (vs {verification.reference})",
                                 " (plan kept)")
    return EngineResult(Path(output), record, verification)


@dataclass
class TrtResult:
    """What ``trt_from_source`` produced: the ONNX kept beside the plan and each stage's result."""

    onnx: Path
    fp32: OnnxResult | None
    precision: PrecisionResult | None
    engine: EngineResult | None


def trt_from_source(
    output: str | Path,
    *,
    load: Callable[[], LoadedModel] | None = None,
    onnx_path: str | Path | None = None,
    request: PrecisionRequest = PrecisionRequest(),
    profile: BatchProfile = BatchProfile(),
    options: BuildOptions | None = None,
    onnx_only: bool = False,
) -> TrtResult:
    """``resnet-export trt``: export (from ``load()``) or take ``onnx_path``, convert for TensorRT, build.

    ``request`` says the precision (fp32: none) and how to verify it. The precision ONNX is kept beside
    the plan as ``OUT.<precision>.onnx`` (``side_onnx_path``). Where TensorRT or a GPU is missing it
    raises TensorRTUnavailable (exit code 4) after writing that ONNX; ``onnx_only`` stops there on purpose.
    """
    output = Path(output)
    check_writable_dir(output)
    precision, val, seed = request.precision, request.val, request.seed
    if (load is None) == (onnx_path is None):
        raise PrecisionError("give exactly one of `load` (a model to export) and `onnx_path`")
    side_onnx = side_onnx_path(output, precision)
    check_not_input([output] if onnx_path and precision == "fp32" else [output, side_onnx],
                    [onnx_path, request.calib, val])
    loaded = reference = fp32_result = precision_result = None
    with tempfile.TemporaryDirectory(prefix="resnet-export-") as work:
        fp32 = Path(onnx_path) if onnx_path else None
        if load is not None:
            loaded = load()
            check_not_input([output, side_onnx], model_files(loaded))
            reference = TorchRunner(loaded.module)
            fp32 = side_onnx if precision == "fp32" else Path(work) / "fp32.onnx"
            fp32_result = onnx_from_model(loaded, fp32, images=val, seed=seed)
        if precision != "fp32":
            temporary = f"the FP32 export of {loaded.name} (temporary, not kept)" if loaded else None
            precision_result = precision_from_onnx(fp32, side_onnx, request, reference=reference,
                                                   source_name=temporary)
        else:
            side_onnx = fp32
        if onnx_only:
            return TrtResult(side_onnx, fp32_result, precision_result, None)
        reason = unavailable_reason()
        if reason:
            checked = precision_result or fp32_result
            passed = (f"passed its {(precision if precision_result else 'fp32').upper()} gate here (top-1 agreement "
                      f"{checked.verification.metrics['top1_agreement']:.1%}, min cosine "
                      f"{checked.verification.metrics['min_cosine']:.5f})" if checked else "was not re-verified here")
            raise TensorRTUnavailable(
                f"cannot build {output} here: {reason}. {side_onnx} is kept and {passed}; to finish on a machine with "
                f"TensorRT and a GPU: resnet-export trt --onnx {side_onnx} -o {output}"
            )
        inputs = verification_inputs(loaded.preprocessing, val, seed=seed) if loaded else None
        engine = engine_from_onnx(side_onnx, output, profile=profile, options=options, reference=reference,
                                  inputs=inputs, seed=seed)
    return TrtResult(side_onnx, fp32_result, precision_result, engine)
