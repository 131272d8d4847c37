"""FP32 ONNX -> FP16 or INT8 ONNX (``precision_from_onnx``), verified under the gate of its precision and weights,
with the rest precision and sensitivity search for TensorRT-target INT8; what a request for one is (``PrecisionRequest``)."""

from __future__ import annotations
import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
import numpy as np
from ..progress import task
from ..data import Inputs, calibration_data, check_calibration_source, image_folder, random_inputs
from ..cpu import CPU_FORMS
from ..manifest import atomic_output, check_not_input, check_writable_dir, sha256_file, write_manifest
from ..onnx_graph import onnx_opset, onnx_preprocessing, qdq_summary
from ..preprocessing import Preprocessing
from ..quantize.precision import MIN_OPSET, RESTS, Conversion, PrecisionError, check_method, quantize_int8, to_fp16
from ..runtime.runners import OrtRunner, Runner
from ..checks.reference_record import PYTORCH, attach, make_record
from ..quantize.sensitivity import rank_quantized_convs
from ..checks.verify import Gate, Verification, plan_gate, verify
from .artifact import stand_in_label, weights_random

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One verified conversion: the rest precision (trt INT8), the convs kept out, and how it did.

    ``ranges_reused``: it quantized with an earlier attempt's activation ranges (no calibration pass), as its
    scales show (``quantize.precision._check_ranges_applied``).
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
        from ..checks.serving import warn_if_trt_int8_on_a_cpu

        warn_if_trt_int8_on_a_cpu(output)
    return PrecisionResult(output, record, verification, excluded, before, attempts, random_weights, reference.name,
                           spec)


def _verified_on_openvino(path: Path, name: str, reference: Runner, inputs: Inputs, gate: Gate) -> dict | None:
    """A CPU-target INT8 ONNX (``path``, to be written as ``name``) verified on OpenVINO too (what ``predict`` serves it
    with by default), against the same reference, inputs and gate: the manifest's ``backends`` section, or None where
    OpenVINO is not installed."""
    from ..checks.serving import openvino_result, openvino_unavailable, verify_on_openvino

    if openvino_unavailable():
        return None
    with task(log, f"Verifying {name} on OpenVINO on {inputs.description}"):
        verification = verify_on_openvino(path, reference, inputs, gate)
    if not verification.passed:
        log.warning(f"OpenVINO's INT8 run misses the gate on this CPU ({'; '.join(verification.failures)}): predict and "
                    "triton will serve this artifact with ONNX Runtime here")
    return {"openvino": openvino_result(verification)}
