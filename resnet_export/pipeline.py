"""The stages composed, each verified and given its manifest.

model -> folded model -> FP32 ONNX (``onnx_from_model``); foreign ONNX -> folded ONNX
(``fold_onnx_file``); FP32 ONNX -> FP16 / INT8 ONNX (``precision_from_onnx``); ONNX -> engine
(``engine_from_onnx``); all of it for ``resnet-export trt`` (``trt_from_source``); any artifact
against PyTorch (``verify_artifact``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from .progress import task
from .data import (
    ImageFolder, Inputs, calibration_data, check_calibration_source, image_folder, random_inputs, verification_inputs,
)
from .errors import OnnxError, first_line
from .export import DEFAULT_OPSET, export_onnx
from .fold import FoldReport, checked_fold, fold_onnx_batchnorm, to_inference_mode
from .cpu import CPU_FORMS, cpu_info, describe_cpu
from .manifest import (
    atomic_output, check_not_input, check_writable_dir, manifest_path, sha256_file, write_json, write_manifest,
)
from .models import LoadedModel, model_files
from .onnx_graph import (
    graph_precision,
    input_spec,
    load_onnx,
    onnx_opset,
    onnx_preprocessing,
    qdq_summary,
    read_metadata,
    set_metadata,
)
from .preprocessing import Preprocessing, stated
from .precision import MIN_OPSET, RESTS, Conversion, PrecisionError, check_method, quantize_int8, to_fp16
from .runners import OrtRunner, Runner, TorchRunner
from .reference_record import PYTORCH, attach, make_record, read_record
from .sensitivity import rank_quantized_convs
from .trt import (
    BatchProfile,
    BuildOptions,
    EngineBuild,
    TensorRTUnavailable,
    TrtRunner,
    build_engine,
    load_manifest,
    profile_batch_sizes,
    unavailable_reason,
)
from .verify import GATES, Gate, Verification, plan_gate, verify
from .verify_ray import scorer_on_ray
from .verify_results import ResultsFile

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
    inputs = verification_inputs(loaded, images, seed=seed) if run_verification else None
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


# --------------------------------------------------------------------------- precision


@dataclass
class Attempt:
    """One verified conversion: the rest precision (trt INT8), the convs kept out, and how it did.

    ``ranges_reused``: it quantized with an earlier attempt's activation ranges (no calibration pass), as its
    scales show (``precision._check_ranges_applied``).
    """

    rest: str | None
    excluded: list[str]
    passed: bool
    failures: list[str]
    metrics: dict
    ranges_reused: bool = False


@dataclass
class PrecisionResult:
    """What ``precision_from_onnx`` produced.

    ``attempts`` lists each conversion that was verified (rest precision, excluded convs, metrics,
    passed), in order; ``before`` holds the metrics prior to any exclusion.
    """

    path: Path
    record: Conversion
    verification: Verification
    excluded: list[tuple[str, float]]
    before: dict | None = None
    attempts: list[Attempt] = field(default_factory=list)
    random_weights: bool = False
    reference: str = ""  # what it was verified against: "torch" or "ort:NAME.onnx"
    preprocessing: Preprocessing | None = None  # what calibration and verification used


REST_CHOICES = ("auto", *RESTS)


@dataclass(frozen=True)
class PrecisionRequest:
    """The precision to make and how to verify it; validated when made.

    ``precision`` is fp32 (no conversion: ``trt`` builds the FP32 ONNX), fp16 or int8. INT8 needs
    ``calib`` (an image folder, ``.npy`` or ``.npz``) and takes ``target``, ``method``,
    ``calib_size``; for the trt target ``rest`` is the precision of the non-quantized part (``auto``:
    FP16, else FP32 with the same ranges); for the cpu target ``cpu_form`` the weight form (portable:
    7-bit, exact on every CPU; vnni: 8-bit). ``val`` holds verification images (default: calibration
    samples held out of calibration). ``min_agreement`` / ``min_cosine`` / ``max_accuracy_drop`` tighten
    or loosen the INT8 gate and start the sensitivity search when it is missed.
    """

    precision: str = "fp32"
    calib: Path | None = None
    target: str = "trt"
    method: str | None = None
    calib_size: int = 512
    seed: int = 0
    val: Path | None = None
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None
    rest: str = "auto"
    cpu_form: str = "portable"
    min_cosine: float | None = None

    def __post_init__(self):
        if self.precision not in ("fp32", "fp16", "int8"):
            raise PrecisionError(f"unknown precision '{self.precision}'; choose fp32, fp16 or int8")
        if self.precision == "int8":
            check_method(self.target, self.method)
            if self.calib is None:
                raise PrecisionError("int8 needs calibration data (`calib`)")
            check_calibration_source(self.calib)  # when asked, not after an export: an empty folder fails at once
        if self.rest not in REST_CHOICES:
            raise PrecisionError(f"unknown rest precision '{self.rest}'; choose one of {', '.join(REST_CHOICES)}")
        if self.rest != "auto" and not self.trt_int8:
            raise PrecisionError("the rest precision is a setting of INT8 for the trt target only")
        if self.cpu_form not in CPU_FORMS:
            raise PrecisionError(f"unknown CPU weight form '{self.cpu_form}'; choose one of {', '.join(CPU_FORMS)}")
        if self.cpu_form != "portable" and not (self.precision == "int8" and self.target == "cpu"):
            raise PrecisionError("the CPU weight form (`cpu_form`) is a setting of INT8 for the cpu target only")
        if self.custom_gate and self.precision != "int8":
            raise PrecisionError("`min_agreement`, `min_cosine` and `max_accuracy_drop` set the INT8 gate; "
                                 f"{self.precision.upper()} keeps its own")
        if self.calib_size < 1:
            raise PrecisionError(f"`calib_size` must be positive, got {self.calib_size}")

    @property
    def trt_int8(self) -> bool:
        """Whether this is INT8 for TensorRT (the case with a rest precision and reusable ranges)."""
        return self.precision == "int8" and self.target == "trt"

    def gate(self, random_weights: bool = False) -> Gate:
        """The precision's gate for weights of that kind (``plan_gate``) with the requested INT8 thresholds."""
        gate = plan_gate(self.precision, random_weights)
        if self.min_agreement is not None:
            gate = replace(gate, min_top1_agreement=self.min_agreement)
        if self.min_cosine is not None:
            gate = replace(gate, min_cosine=self.min_cosine)
        if self.max_accuracy_drop is not None:
            gate = replace(gate, max_accuracy_drop=self.max_accuracy_drop)
        return gate

    @property
    def custom_gate(self) -> bool:
        """Whether the request sets an INT8 threshold of its own."""
        return any(v is not None for v in (self.min_agreement, self.min_cosine, self.max_accuracy_drop))


def precision_from_onnx(
    source: str | Path,
    output: str | Path,
    request: PrecisionRequest,
    *,
    reference: Runner | None = None,
    source_name: str | None = None,
    preprocessing: Preprocessing | None = None,
) -> PrecisionResult:
    """Make the FP16 or INT8 ONNX of ``source`` as ``request`` says, verify it and write its manifest.

    The reference is ``reference`` (PyTorch, when the caller has the model) or ``source`` on ONNX
    Runtime. An INT8 model for the trt target tries the rest precisions ``request.rest`` allows; with
    ``min_agreement`` or ``max_accuracy_drop`` one that still misses its gate gets its most sensitive
    convolutions kept in higher precision until it passes. Raises GateFailed (artifact and manifest
    kept) when the gate is still missed. ``source_name`` is what the manifest records as the source
    ONNX when ``source`` is a temporary file (``trt`` from a model). ``preprocessing`` states the
    preprocessing of an ONNX made elsewhere (``foreign_preprocessing``); it is used and stored.
    """
    precision, calib, target, method = request.precision, request.calib, request.target, request.method
    calib_size, seed, val, rest = request.calib_size, request.seed, request.val, request.rest
    source, output = Path(source), Path(output)
    check_writable_dir(output)
    check_not_input([output], [source, calib, val])
    if precision == "fp32":
        raise PrecisionError("precision_from_onnx makes fp16 or int8; an FP32 ONNX comes from onnx_from_model")
    if onnx_opset(source) < MIN_OPSET:
        raise PrecisionError(f"{source} has opset {onnx_opset(source)}; FP16 and INT8 need {MIN_OPSET} or newer "
                             f"(ModelOpt's quantizer and AutoCast): export it with `opset` {MIN_OPSET} or more")
    trt_int8 = request.trt_int8
    spec = preprocessing or onnx_preprocessing(source)
    metadata = {"preprocessing": spec.to_dict()} if preprocessing else None
    if precision == "int8":  # verification never sees a calibration sample
        calibration, held_out = calibration_data(calib, spec, calib_size, seed, held_out=val is None)
        inputs = image_folder(val, spec) if val else held_out
    else:
        inputs = image_folder(val, spec) if val else random_inputs(spec, 32, seed)
    random_weights = weights_random(source)  # gated on fidelity alone: their top-1 decisions are near-ties
    gate, custom_gate = request.gate(random_weights), request.custom_gate
    reference_label = PYTORCH if reference is not None else stand_in_label(source)
    reference = reference or OrtRunner(source)
    attempts: list[Attempt] = []

    with tempfile.TemporaryDirectory(prefix="resnet-export-") as work:
        work = Path(work)
        ranges = work / "ranges.cache"

        def convert(rest_dtype: str | None, exclude: list[str]) -> tuple[Path, Conversion, Verification]:
            """One conversion into the work folder, verified; calibration ranges reused after the first."""
            path = work / f"attempt-{len(attempts)}.onnx"
            if precision == "fp16":
                record = to_fp16(source, path, metadata)
            elif trt_int8:
                reuse = ranges if ranges.is_file() else None
                record = quantize_int8(source, path, calibration.array, target, method, exclude, rest_dtype,
                                       ranges=reuse, save_ranges=None if reuse else ranges, metadata=metadata)
            else:
                record = quantize_int8(source, path, calibration.array, target, method, exclude,
                                       cpu_form=request.cpu_form, metadata=metadata)
            label = f"{output.name}" + (f" (rest {rest_dtype.upper()})" if rest_dtype else "")
            with task(log, f"Verifying {label} on {inputs.description}"):
                candidate = OrtRunner(path)
                exact = OrtRunner(path, exact=True) if precision == "int8" else None
                verification = verify(reference, candidate, inputs, gate, candidate.fixed_batch, exact=exact,
                                      described_reference=reference_label)
            if candidate.fp16_quantize_rewritten:
                record.cpu_verification_note = (
                    f"{candidate.fp16_quantize_rewritten} float16 QuantizeLinear evaluated in float32 on ONNX "
                    "Runtime's CPU provider, which truncates them (onnxruntime#18576)")
            attempts.append(Attempt(rest_dtype, list(exclude), verification.passed, verification.failures,
                                    verification.metrics, record.ranges_reused))
            return path, record, verification

        rests = ([None] if not trt_int8 else ["fp16", "fp32"] if rest == "auto" else [rest])
        tried = []
        for rest_dtype in rests:
            tried.append(convert(rest_dtype, []))
            if tried[-1][2].passed:
                break
        best = next((t for t in tried if t[2].passed), None) or max(
            tried, key=lambda t: (t[2].metrics["top1_agreement"], t[2].metrics["min_cosine"]))
        chosen_rest = attempts[tried.index(best)].rest
        if len(tried) > 1:
            why = ("FP16 rest missed the gate ({}); FP32 rest {}".format(
                "; ".join(attempts[0].failures), "passed" if best[2].passed else "missed it too"))
            log.warning(f"{why}: kept the {chosen_rest.upper()} rest")
        path, record, verification = best
        excluded, before = [], None
        searching = precision == "int8" and not verification.passed and custom_gate
        if searching:
            before = verification.metrics
            with task(log, "Ranking quantized convolutions by sensitivity"):
                ranking = rank_quantized_convs(source, path, inputs.head(32).array)
            count = 1
            while not verification.passed and count <= len(ranking):
                excluded = ranking[:count]
                log.warning(f"{', '.join(verification.failures)}: keeping {count} most sensitive conv(s) in higher precision")
                path, record, verification = convert(chosen_rest, [name for name, _ in excluded])
                count *= 2
            if not verification.passed and len(excluded) < len(ranking):
                excluded = ranking
                path, record, verification = convert(chosen_rest, [name for name, _ in excluded])
        attach(path, make_record(inputs, reference, spec, reference_label, "quantize"))
        backends = None
        if precision == "int8" and target == "cpu":
            backends = _verified_on_openvino(path, output.name, reference, inputs, gate)
        with atomic_output(output) as tmp:
            shutil.copyfile(path, tmp)
    write_manifest(
        output,
        stage="quantize",
        precision=precision,
        source={"onnx": source_name or str(source), "sha256": sha256_file(source), "reference": reference.name,
                "random_weights": random_weights},
        settings={"target": target if precision == "int8" else None, "calib": str(calib) if calib else None,
                  "calib_size": calib_size, "seed": seed, "val": str(val) if val else None,
                  "rest": rest if trt_int8 else None,
                  "cpu_form": request.cpu_form if precision == "int8" and target == "cpu" else None},
        conversion=record.to_dict(),
        preprocessing=spec.to_dict(),
        rest={"requested": rest, "chosen": chosen_rest, "attempts": [asdict(a) for a in attempts]} if trt_int8 else None,
        qdq=qdq_summary(output),
        sensitivity={"excluded": [{"node": n, "added_error": e} for n, e in excluded], "metrics_before": before}
        if searching else None,
        verification=verification.to_dict(),
        backends=backends,
    )
    verification.raise_if_failed(f"{output} failed the {precision.upper()} gate", " (artifact kept)")
    if trt_int8:
        from .serving import warn_if_trt_int8_on_a_cpu

        warn_if_trt_int8_on_a_cpu(output)
    return PrecisionResult(output, record, verification, excluded, before, attempts, random_weights, reference.name,
                           spec)


def _verified_on_openvino(path: Path, name: str, reference: Runner, inputs: Inputs, gate: Gate) -> dict | None:
    """A CPU-target INT8 ONNX (``path``, to be written as ``name``) verified on OpenVINO too (what ``predict`` serves it
    with by default), against the same reference, inputs and gate: the manifest's ``backends`` section, or None where
    OpenVINO is not installed."""
    from .serving import openvino_result, openvino_unavailable, verify_on_openvino

    if openvino_unavailable():
        return None
    with task(log, f"Verifying {name} on OpenVINO on {inputs.description}"):
        verification = verify_on_openvino(path, reference, inputs, gate)
    if not verification.passed:
        log.warning(f"OpenVINO's INT8 run misses the gate on this CPU ({'; '.join(verification.failures)}): predict and "
                    "triton will serve this artifact with ONNX Runtime here")
    return {"openvino": openvino_result(verification)}


# --------------------------------------------------------------------------- engines and verification


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


def _plan_checks(engine: TrtRunner, precision: str, onnx_path: Path, tf32: bool) -> tuple[Gate, list[int]]:
    """A plan's gate (``plan_gate``, by what its ONNX, where it is here, says of the weights) and the batches it is
    verified at: its profile's smallest, tuned and largest."""
    random_weights = Path(onnx_path).is_file() and weights_random(onnx_path)
    sizes = profile_batch_sizes(engine.profile_min_batch, engine.profile_opt_batch, engine.profile_max_batch)
    return plan_gate(precision, random_weights, tf32), sizes


def recorded_reference(onnx_path: str | Path, count: int = 8, seed: int = 0) -> tuple[Inputs, np.ndarray, str]:
    """The inputs and reference logits that stand for ``onnx_path``'s model, and what they are in words.

    The reference the ONNX carries from its own verification (``reference_record``: PyTorch FP32's logits, or
    what stood for PyTorch then); when it carries none, ``count`` seeded random inputs and the ONNX itself on
    ONNX Runtime, said to be a fallback.
    """
    recorded = read_record(onnx_path)
    if recorded is not None:
        return recorded.as_inputs(), recorded.logits, recorded.summary()
    inputs = random_inputs(onnx_preprocessing(onnx_path), count, seed)
    return inputs, OrtRunner(onnx_path).infer(inputs.array), (
        f"{Path(onnx_path).name} on ONNX Runtime on {inputs.description} (the ONNX records no reference: "
        "compared with the ONNX it was built from, not with PyTorch)")


def weights_random(onnx_path: str | Path) -> bool:
    """Whether the ONNX says its model had random weights (its metadata's source); False when it does not say."""
    source = read_metadata(onnx_path).get("source") or {}
    return "weights" in source and source["weights"] is None


def stand_in_label(fp32_onnx: str | Path) -> str:
    """What an FP32 ONNX on ONNX Runtime is, as a reference: how close it came to PyTorch when it was made."""
    recorded = recorded_verification(fp32_onnx) or {}
    error = (recorded.get("metrics") or {}).get("max_rel_err")
    name = Path(fp32_onnx).name
    if recorded.get("passed") and error is not None and "PyTorch" in (recorded.get("reference") or PYTORCH):
        return f"FP32 ONNX {name} (on ONNX Runtime; it matched PyTorch FP32 to a relative error of {error:.1g})"
    return f"FP32 ONNX {name} (on ONNX Runtime)"


def artifact_precision(artifact: str | Path) -> tuple[str, str]:
    """fp32, fp16 or int8, and where it was read: the manifest, the ONNX metadata, or the graph itself
    (Q/DQ nodes: int8; float16 weights: fp16; neither: fp32). A plan needs its manifest."""
    artifact = Path(artifact)
    sidecar = manifest_path(artifact)
    if sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text()).get("precision")
        except ValueError:
            recorded = None
        dtype = recorded.get("dtype") if isinstance(recorded, dict) else recorded
        if dtype in GATES:
            return dtype, "its manifest"
    if artifact.suffix != ".onnx":
        raise OnnxError(f"{artifact} has no manifest ({artifact.name}.json) to tell its precision: pass `precision`")
    recorded = graph_precision(artifact)
    return recorded["dtype"], recorded.get("from", "its metadata")


def artifact_preprocessing(artifact: Path, loaded: LoadedModel) -> Preprocessing:
    """How inputs are made for ``artifact``: its own preprocessing (an ONNX's metadata, a plan's source ONNX),
    else MODEL's when its input size fits the graph, else one derived from the graph's input shape.

    MODEL options that state another preprocessing than the artifact's get a warning; the artifact's wins.
    """
    source = artifact
    if artifact.suffix != ".onnx":
        source = Path((load_manifest(artifact) or {}).get("onnx", ""))
    if not source.is_file() or source.suffix != ".onnx":
        return loaded.preprocessing
    model = load_onnx(source, load_weights=False)
    stored = read_metadata(model).get("preprocessing")
    graph = input_spec(model)
    if stored:
        spec = Preprocessing.from_dict(stored)
    elif (loaded.preprocessing.channels, loaded.preprocessing.input_size) == (graph.channels, graph.input_size):
        spec = loaded.preprocessing
    else:
        spec = graph
    if not spec.same_as(loaded.preprocessing):
        log.warning(f"the model options state another preprocessing ({loaded.preprocessing.describe()}) than "
                    f"{artifact.name} ({spec.describe()}): verifying with the artifact's")
    return spec


def verify_artifact(artifact: str | Path, loaded: LoadedModel | None, *, images: str | Path | None = None,
                    seed: int = 0, precision: str | None = None, backend: str = "ort",
                    results: str | Path | None = None, resume: bool = False, ray_address: str | None = None,
                    workers: int = 2, decoders: int | None = None) -> tuple[str, str, Verification]:
    """Compare an ONNX file or a plan with PyTorch using its precision's gate.

    With ``loaded`` (the PyTorch model) on ``images`` or seeded random inputs, preprocessed as the artifact says
    (``artifact_preprocessing``). Without it, against the reference the artifact (a plan: its ONNX) recorded when
    it was made (``reference_record``). The precision, and so the gate, comes from the artifact
    (``artifact_precision``) unless ``precision`` is given; returns it, where it came from, and the
    verification. A plan runs every batch of its profile (smallest, tuned, largest) and is gated as it was built
    (``plan_gate``). An ONNX runs on ONNX Runtime (``backend`` ort; an INT8 one also exactly, graph optimizations
    off: its fused run on this CPU must match) or compiled by OpenVINO for this CPU (``backend`` openvino).

    ``images`` (a folder) stream through a pool of ``decoders`` threads (``image_stream``), and the per-image results
    to ``results`` (JSON Lines; ``resume`` continues an interrupted run); with ``ray_address`` the batches are
    scored by ``workers`` Ray actors (``verify_ray``), with the same figures.
    """
    artifact = Path(artifact)
    if artifact.suffix not in (".onnx", ".plan", ".engine"):
        raise OnnxError(f"{artifact}: expected an .onnx file or a TensorRT .plan")
    if not artifact.is_file():
        raise OnnxError(f"{artifact} not found")
    precision, origin = (precision, "requested") if precision else artifact_precision(artifact)
    recorded = recorded_verification(artifact)
    if recorded and recorded.get("cpu") and _cpu_key(recorded["cpu"]) != _cpu_key(cpu_info()):
        log.warning(f"{artifact.name} was verified on {describe_cpu(recorded['cpu'])} when made; "
                    f"re-checking on this machine, {describe_cpu(cpu_info())}")
    onnx_path = artifact if artifact.suffix == ".onnx" else Path((load_manifest(artifact) or {}).get("onnx", ""))
    if backend not in ("ort", "openvino") or (backend == "openvino" and artifact.suffix != ".onnx"):
        raise OnnxError(f"`backend` {backend} does not verify {artifact.suffix} files: ort or openvino run an ONNX")
    candidate = _candidate(artifact, backend, precision)
    if loaded is None:
        inputs, reference, described = _recorded_reference(artifact, onnx_path, images)
    else:
        spec = artifact_preprocessing(artifact, loaded)
        _check_input_shape(artifact, candidate, spec)
        inputs = image_folder(images, spec) if images else random_inputs(spec, 8, seed)
        if decoders is not None and images:
            inputs.decoders = decoders
        reference, described = TorchRunner(loaded.module), f"{PYTORCH} on {inputs.description}"
    exact = OrtRunner(artifact, exact=True) if isinstance(candidate, OrtRunner) and precision == "int8" else None
    gate, sizes, slack = plan_gate(precision, onnx_path.is_file() and weights_random(onnx_path)), None, 0
    if isinstance(candidate, TrtRunner):  # every batch of the engine's optimization profile, as it was built
        options = (load_manifest(artifact) or {}).get("options", {})
        (gate, sizes), slack = _plan_checks(candidate, precision, onnx_path, options.get("tf32", False)), 1
    streamed = results if images and loaded is not None else None
    if streamed:
        check_not_input([streamed], [artifact, images])
        check_writable_dir(Path(streamed))
        streamed = ResultsFile(streamed, {"artifact": artifact.name, "sha256": sha256_file(artifact),
                                          "reference": described, "backend": backend}, resume)
    scorer = None
    if ray_address:
        if not isinstance(inputs, ImageFolder):
            raise OnnxError("`ray` verifies an image folder against the PyTorch model: give MODEL and `images`")
        make = partial(_runners, loaded.module, artifact, backend, precision, exact is not None)
        scorer = scorer_on_ray(inputs, make, ray_address, workers)
    with task(log, f"Verifying {artifact.name} against {described}"):
        verification = verify(reference, candidate, inputs, gate, getattr(candidate, "fixed_batch", None), sizes,
                              exact=exact, cover=sizes is not None, described_reference=described, slack=slack,
                              results=streamed, scorer=scorer)
    if streamed:  # the summary beside the per-image results, passed or not
        write_json(Path(results).with_suffix(".json"), {"artifact": str(artifact), "precision": precision,
                                                        "images": str(images), "verification": verification.to_dict()})
    verification.raise_if_failed(f"{artifact} failed the {precision.upper()} gate (precision from {origin}; "
                                 f"vs {described})")
    return precision, origin, verification


def _candidate(artifact: Path, backend: str, precision: str) -> Runner:
    """What runs ``artifact`` for ``verify_artifact``: TensorRT for a plan, else ONNX Runtime or OpenVINO."""
    if artifact.suffix != ".onnx":
        return TrtRunner(artifact)
    if backend == "openvino":
        from .runners import OpenVinoRunner

        return OpenVinoRunner(artifact, precision, None)
    return OrtRunner(artifact)


def _runners(module, artifact: Path, backend: str, precision: str, exact: bool) -> tuple:
    """The reference, candidate and exact runners of ``verify_artifact``, made where they run (a Ray actor)."""
    return (TorchRunner(module), _candidate(artifact, backend, precision),
            OrtRunner(artifact, exact=True) if exact else None)


def _recorded_reference(artifact: Path, onnx_path: Path, images: str | Path | None):
    """The inputs, reference logits and words an artifact is verified against when no model is given: what its ONNX
    recorded; for a plan whose ONNX recorded nothing, that ONNX on ONNX Runtime (said so)."""
    if images:
        raise OnnxError("`images` need the PyTorch model to compare with: give MODEL too")
    if not onnx_path.is_file():
        raise OnnxError(f"{artifact.name}: its ONNX ({onnx_path or 'not named by a manifest'}) is not here to say "
                        "what it stands for; give the model (--arch/--model and --weights) to compare with PyTorch")
    if onnx_path == artifact and read_record(onnx_path) is None:
        raise OnnxError(f"{artifact.name} records no reference to verify against; give the model "
                        "(--arch/--model and --weights) to compare with PyTorch")
    return recorded_reference(onnx_path)


def _check_input_shape(artifact: Path, candidate, spec: Preprocessing) -> None:
    """A one-line error before anything runs when the preprocessing makes inputs the graph cannot take."""
    expected = tuple(candidate.session.get_inputs()[0].shape[1:]) if isinstance(candidate, OrtRunner) else None
    given = (spec.channels, *spec.input_size)
    if expected and any(isinstance(e, int) and e != g for e, g in zip(expected, given)):
        raise OnnxError(f"{artifact.name} takes inputs of {list(expected)} but its preprocessing makes {list(given)}: "
                        "state it with `resize`/`input_size` as the model was trained")


def _cpu_key(info: dict) -> tuple:
    return info.get("model"), info.get("arch"), tuple(info.get("flags", ()))


def recorded_verification(artifact: str | Path) -> dict | None:
    """The verification the artifact's manifest recorded when it was made (metrics, gate, CPU), if any."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("verification")
    except (OSError, ValueError):
        return None


def recorded_source(artifact: str | Path) -> Path | None:
    """The ONNX a precision ONNX was made from, as its manifest records it, when that file is here and is FP32."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        source = Path((json.loads(path.read_text()).get("source") or {}).get("onnx") or "")
    except (OSError, ValueError):
        return None
    if source.suffix != ".onnx" or not source.is_file():
        return None
    return source if graph_precision(source)["dtype"] == "fp32" else None


def side_onnx_path(plan: Path, precision: str) -> Path:
    """Where ``trt`` keeps the precision ONNX of ``plan``: ``OUT.fp16.onnx`` for ``OUT.plan``, and so on;
    ``resnet50.int8.onnx`` for ``resnet50.int8.plan``, whose name already says it.

    The precision in the name keeps it apart from the FP32 ONNX a user typically names ``OUT.onnx``.
    """
    if plan.stem.endswith(f".{precision}"):
        return plan.with_suffix(".onnx")
    return plan.with_name(f"{plan.stem}.{precision}.onnx")


#: Precision parts of a file name that a default output name replaces rather than repeats.
_PRECISION_PARTS = re.compile(r"\.(fp32|fp16|int8|cpu-int8)$")


def default_output(stem: str, precision: str = "fp32", target: str = "trt", suffix: str = ".onnx") -> Path:
    """The output a command writes in the current directory when ``-o`` is not given, named from the model (or its
    input's stem), precision and target: ``resnet50.onnx``, ``resnet50.fp16.onnx``, ``resnet50.int8.onnx`` (TensorRT
    target), ``resnet50.cpu-int8.onnx``, ``resnet50.int8.plan``."""
    stem = _PRECISION_PARTS.sub("", stem)
    part = "" if precision == "fp32" else f".{'cpu-' if precision == 'int8' and target == 'cpu' else ''}{precision}"
    return Path(f"{stem}{part}{suffix}")


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
        inputs = verification_inputs(loaded, val, seed=seed) if loaded else None
        engine = engine_from_onnx(side_onnx, output, profile=profile, options=options, reference=reference,
                                  inputs=inputs, seed=seed)
    return TrtResult(side_onnx, fp32_result, precision_result, engine)
