"""FP32 ONNX -> FP16 ONNX (ModelOpt AutoCast) and INT8 Q/DQ ONNX (calibrated), all on the CPU.

TensorRT 11 has no precision flags or calibrators: the precision lives in the ONNX graph.
- ``target="trt"``: ModelOpt's ONNX PTQ, symmetric int8, Q/DQ placed the way TensorRT fuses residual
  blocks; the non-quantized rest in FP16 or FP32 (``rest``). Activation ranges travel as a TensorRT
  calibration cache: percentile ranges come from ONNX Runtime's calibrator that way (the placement
  stays ModelOpt's), and every quantization saves its ranges so later attempts (the other rest
  precision, convs excluded) reuse them instead of calibrating again.
- ``target="cpu"``: ONNX Runtime ``quantize_static``, QDQ, uint8 activations, int8 per-channel weights
  (ONNX Runtime's fast x86 path), after ``quant_pre_process``. The ``portable`` form (default) keeps
  the weights to 7 bits so ONNX Runtime's fused kernels are exact on every CPU; ``vnni`` uses all 8 bits,
  exact only on CPUs with VNNI, AMX or ARM64 dot products (see cpu.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from ..cpu import CPU_FORMS, PEAK_7BIT
from ..errors import OnnxError, ResnetExportError, first_line
from ..onnx_graph import conv_weight_peak, input_dims, load_onnx, read_metadata, set_metadata
from ..manifest import atomic_output
from ..progress import task

log = logging.getLogger(__name__)

TARGETS = ("trt", "cpu")
#: Precision of the non-quantized part of a TensorRT-target INT8 model.
RESTS = ("fp16", "fp32")
CALIB_METHODS = {"trt": ("entropy", "max", "percentile"), "cpu": ("minmax", "entropy", "percentile")}
DEFAULT_METHOD = {"trt": "entropy", "cpu": "minmax"}
PERCENTILE = 99.99
CALIB_BATCH = 32
#: ModelOpt's ONNX quantizer and AutoCast need opset 19 or newer (float16 QuantizeLinear, their Cast rules).
MIN_OPSET = 19


class PrecisionError(ResnetExportError):
    """A precision conversion was asked for with unusable settings, or failed."""


@dataclass
class Conversion:
    """How a precision ONNX was made; stored in its metadata (``precision``) and its manifest."""

    dtype: str
    tool: str
    target: str | None = None
    calibration_method: str | None = None
    calibration_samples: int | None = None
    excluded_nodes: list[str] = field(default_factory=list)
    rest: str | None = None
    ranges_reused: bool = False  # trt target: its activation scales are those of the ranges given (checked)
    calibration_seconds: float | None = None
    keep_io_types: bool | None = None
    cpu_verification_note: str | None = None
    #: cpu target: ``portable`` (7-bit weights) or ``vnni`` (8-bit); see cpu.py.
    cpu_form: str | None = None
    #: cpu target, measured in the artifact: the largest |weight| of its quantized convs, and so its width
    #: (7 when within ONNX Runtime's reduce_range [-64, 64], whose pairs of u8 products cannot saturate 16 bits).
    weight_peak: int | None = None
    weight_bits: int | None = None

    def to_dict(self) -> dict:
        """The record as JSON, without the fields that do not apply."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class CalibrationReader:
    """ONNX Runtime / ModelOpt calibration reader over preprocessed batches, reporting each batch."""

    def __init__(self, input_name: str, array: np.ndarray, on_batch: Callable[[], None] | None = None,
                 batch_size: int = CALIB_BATCH):
        self.input_name = input_name
        self.batches = [array[i:i + batch_size] for i in range(0, len(array), batch_size)]
        self.on_batch = on_batch
        self._iter: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        if batch is None:
            return None
        if self.on_batch:
            self.on_batch()
        return {self.input_name: batch}

    def get_first(self) -> dict[str, np.ndarray]:
        return {self.input_name: self.batches[0]}

    def rewind(self) -> None:
        self._iter = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@contextlib.contextmanager
def _quiet_tools() -> Iterator[None]:
    """Keep ModelOpt's and ONNX Runtime's logs, prints and tqdm bars off the terminal."""
    loggers = [logging.getLogger(name) for name in ("modelopt", "onnxruntime", "root")]
    levels = [logger.level for logger in loggers]
    old_tqdm = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if old_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_tqdm


def _save_with_metadata(model: onnx.ModelProto, source: Path, output: Path, precision: Conversion,
                        metadata: dict | None = None) -> None:
    """Carry the source's toolkit metadata forward with ``metadata`` and the precision record; check, save atomically."""
    set_metadata(model, {**read_metadata(source), **(metadata or {}), "precision": precision.to_dict()})
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # checker raises ValidationError and friends
        raise OnnxError(f"the converted model fails onnx.checker: {first_line(exc)}") from exc
    with atomic_output(output) as tmp:
        onnx.save(model, str(tmp))


def input_name(path: str | Path) -> str:
    """The name of an ONNX model's (first) graph input."""
    return input_dims(load_onnx(path, load_weights=False))[0]


def to_fp16(source: str | Path, output: str | Path, metadata: dict | None = None) -> Conversion:
    """Convert an FP32 ONNX to FP16 with ModelOpt AutoCast, FP32 inputs and outputs kept.

    Returns the record of the conversion, stored in the model's metadata with ``metadata`` (e.g. the
    preprocessing stated for an ONNX made elsewhere).
    """
    from modelopt.onnx.autocast import convert_to_mixed_precision

    source, output = Path(source), Path(output)
    load_onnx(source, load_weights=False)
    with task(log, "Converting to FP16 (ModelOpt AutoCast)"), _quiet_tools():
        try:
            model = convert_to_mixed_precision(onnx_path=str(source), low_precision_type="fp16", keep_io_types=True)
        except Exception as exc:  # AutoCast raises assorted errors on unsupported graphs
            raise PrecisionError(f"FP16 conversion of {source} failed: {first_line(exc)}") from exc
    record = Conversion("fp16", "modelopt.autocast", keep_io_types=True)
    _save_with_metadata(model, source, output, record, metadata)
    return record


def check_method(target: str, method: str | None) -> str:
    """The calibration method to use for ``target`` (its default when None), or a one-line error."""
    if target not in TARGETS:
        raise PrecisionError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    method = method or DEFAULT_METHOD[target]
    if method not in CALIB_METHODS[target]:
        raise PrecisionError(
            f"calibration method '{method}' is not available for `target` {target}; "
            f"choose one of {', '.join(CALIB_METHODS[target])}"
        )
    return method


def quantize_int8(
    source: str | Path,
    output: str | Path,
    calibration: np.ndarray,
    target: str = "trt",
    method: str | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    rest: str = "fp16",
    ranges: str | Path | None = None,
    save_ranges: str | Path | None = None,
    cpu_form: str = "portable",
    metadata: dict | None = None,
) -> Conversion:
    """Calibrate on ``calibration`` (preprocessed ``(N, C, H, W)``) and write an INT8 Q/DQ ONNX.

    ``exclude`` names Conv nodes kept in higher precision. For the trt target, ``rest`` is the
    precision of everything not quantized, ``ranges`` a calibration cache saved by an earlier call
    (its activation ranges are reused: no calibration pass over the data) and ``save_ranges`` where
    to save this call's ranges. For the cpu target, ``cpu_form`` is the weight form (``CPU_FORMS``).
    Returns the record of the conversion, stored in the model's metadata with ``metadata``.
    """
    source, output = Path(source), Path(output)
    method = check_method(target, method)
    if cpu_form not in CPU_FORMS:
        raise PrecisionError(f"unknown CPU weight form '{cpu_form}'; choose one of {', '.join(CPU_FORMS)}")
    if rest not in RESTS:
        raise PrecisionError(f"unknown rest precision '{rest}'; choose one of {', '.join(RESTS)}")
    if target == "cpu" and (ranges or save_ranges):
        raise PrecisionError("calibration ranges are reused for the trt target only")
    name = input_name(source)
    tool = "modelopt.onnx.quantization" if target == "trt" else "onnxruntime.quantization"
    record = Conversion("int8", tool, target, method, int(len(calibration)), list(exclude))
    if target == "trt":
        record.rest = rest
    else:
        record.cpu_form = cpu_form
    with tempfile.TemporaryDirectory(prefix="resnet-export-") as work:
        work = Path(work)
        model_copy = work / "model.onnx"  # ModelOpt rewrites its input in place
        shutil.copyfile(source, model_copy)
        # With known ranges ModelOpt still runs its calibrator before it replaces the scales: one batch does.
        np.save(work / "calibration.npy", calibration[:CALIB_BATCH] if ranges else calibration)
        if ranges:
            shutil.copyfile(ranges, work / "ranges.cache")
        quantized = work / "int8.onnx"
        passes = 2 if (target == "trt" and method == "percentile" and not ranges) else 1
        total = 1 if ranges else passes * -(-len(calibration) // CALIB_BATCH)
        what = "Quantizing INT8 with the saved ranges" if ranges else "Calibrating INT8"
        start = time.perf_counter()
        _run_isolated(_quantize_worker, (str(work), name, target, method, list(exclude), rest, bool(ranges),
                                               CPU_FORMS[cpu_form]),
                      f"{what} ({target}, {method})", total, f"INT8 quantization of {source} failed")
        record.calibration_seconds = round(time.perf_counter() - start, 1)
        log.info(f"{what} ({target}, {method}{f', rest {rest.upper()}' if target == 'trt' else ''}) "
                 f"on {len(calibration)} samples in {record.calibration_seconds} s")
        if ranges:  # what the artifact's scales are, read from them, not the argument
            record.ranges_reused = _check_ranges_applied(Path(ranges), work / "ranges.cache", source)
        if save_ranges:
            shutil.copyfile(work / "ranges.cache", save_ranges)
        model = onnx.load(str(quantized))
        if target == "cpu":  # what the artifact's weights are, read from them, not the form asked for
            record.weight_peak = conv_weight_peak(model)
            if record.weight_peak is not None:  # None: every conv kept out of INT8
                record.weight_bits = 7 if record.weight_peak <= PEAK_7BIT else 8
            if (record.weight_bits or 0) > CPU_FORMS[cpu_form]:
                raise PrecisionError(f"the {cpu_form} form needs {CPU_FORMS[cpu_form]}-bit weights, but the "
                                     f"quantized convs of {source} reach {record.weight_peak}")
        _save_with_metadata(model, source, output, record, metadata)
    return record


#: What a quantization's process starts from: this module, ONNX Runtime's quantizer and ModelOpt, imported once.
#: Importing ModelOpt patches nothing (its ort_utils calls patch_ort_modules inside quantize, in the child).
PRELOADED = ["resnet_export.quantize.precision", "onnxruntime.quantization", "modelopt.onnx.quantization"]


def _worker_context():
    """Where each quantization runs: a fresh process forked from a server that imported ``PRELOADED`` once (2-3 s
    less per call than a spawned interpreter importing them again: 7.3 -> 4.3 s for the trt target, 4.8 -> 2.5 s
    for the cpu target, measured on resnet18), or spawned where forkserver is missing."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    multiprocessing.set_forkserver_preload(PRELOADED)  # read when the server starts, the first call
    return multiprocessing.get_context("forkserver")


def _run_isolated(worker, args: tuple, description: str, total: int, failure: str) -> None:
    """Run ``worker(*args, queue)`` in a fresh process, advancing a progress bar on its messages.

    ModelOpt monkey-patches ONNX Runtime's quantization modules process-wide when it runs, so each
    quantization gets a clean process: ONNX Runtime's CPU path stays ONNX Runtime's own, whatever
    ran before.
    """
    import queue as queue_module

    context = _worker_context()
    messages = context.Queue()
    process = context.Process(target=worker, args=(*args, messages), daemon=True)
    error = None
    with task(log, description, total, done=False) as advance:
        process.start()
        while True:
            try:
                kind, value = messages.get(timeout=0.5)
            except queue_module.Empty:
                if not process.is_alive():
                    error = error or f"the worker process exited with code {process.exitcode}"
                    break
                continue
            if kind == "batch":
                advance()
            elif kind == "error":
                error = value
            else:
                break
    process.join()
    if error:
        raise PrecisionError(f"{failure}: {error}")


def _quantize_worker(work: str, name: str, target: str, method: str, exclude: list[str], rest: str,
                     reuse_ranges: bool, weight_bits: int, messages) -> None:
    """Child-process body of quantize_int8: calibrate ``work/model.onnx`` into ``work/int8.onnx``."""
    work_path = Path(work)
    try:
        with _quiet_tools(), contextlib.redirect_stderr(io.StringIO()):  # tqdm bars of the calibrators
            calibration = np.load(work_path / "calibration.npy")
            reader = CalibrationReader(name, calibration, lambda: messages.put(("batch", 1)))
            if target == "trt":
                _quantize_trt(work_path, reader, method, exclude, rest, reuse_ranges)
            else:
                _quantize_cpu(work_path / "model.onnx", work_path / "int8.onnx", reader, method, exclude, work_path,
                              weight_bits)
    except Exception as exc:  # reported to the parent as one line
        messages.put(("error", first_line(exc)))
    messages.put(("done", None))


def _quantize_trt(work: Path, reader: CalibrationReader, method: str, exclude: list[str], rest: str,
                  reuse_ranges: bool) -> None:
    """ModelOpt PTQ of ``work/model.onnx`` with the rest in FP32, then the rest cast to ``rest``.

    The FP32-rest model is what calibration yields; its activation scales are saved as
    ``work/ranges.cache``. The FP16 rest is ModelOpt's own conversion (``convert_to_f16``, as its
    ``high_precision_dtype="fp16"`` does), applied to that model, so both rests share one calibration.
    """
    from modelopt.onnx.autocast.convert import convert_to_f16
    from modelopt.onnx.quantization import quantize

    cache = work / "ranges.cache"
    if not reuse_ranges and method == "percentile":
        _write_percentile_cache(work / "model.onnx", reader, cache, work)
        reader.rewind()
    fp32_rest = work / "int8-fp32-rest.onnx"
    quantize(
        onnx_path=str(work / "model.onnx"),
        quantize_mode="int8",
        calibration_data_reader=reader,
        calibration_method="entropy" if method == "entropy" else "max",
        calibration_cache_path=str(cache) if cache.is_file() else None,
        calibration_eps=["cpu"],
        nodes_to_exclude=[f"^{re.escape(name)}$" for name in exclude],  # ModelOpt takes regexes
        high_precision_dtype="fp32",
        output_path=str(fp32_rest),
        log_level="ERROR",
    )
    model = onnx.load(str(fp32_rest))
    _write_ranges(model, cache)
    if rest == "fp16":
        model = convert_to_f16(model, keep_io_types=True)
    onnx.save(model, str(work / "int8.onnx"))


def _write_ranges(model: onnx.ModelProto, cache: Path) -> None:
    """Save the activation scales of ``model``'s QuantizeLinear nodes as a TensorRT calibration cache."""
    inits = {i.name: i for i in model.graph.initializer}
    lines = ["TRT-100000-EntropyCalibration2"]
    for node in model.graph.node:
        scale = inits.get(node.input[1]) if node.op_type == "QuantizeLinear" else None
        if scale is not None and node.input[0] not in inits and numpy_helper.to_array(scale).size == 1:
            lines.append(f"{node.input[0]}: {struct.pack('!f', float(numpy_helper.to_array(scale))).hex()}")
    cache.write_text("\n".join(lines) + "\n")


def _read_ranges(cache: Path) -> dict[str, str]:
    """A calibration cache's activation scales by tensor name (hex float32, as written)."""
    return dict(line.split(": ", 1) for line in cache.read_text().splitlines()[1:] if ": " in line)


def _check_ranges_applied(saved: Path, written: Path, source: Path) -> bool:
    """True when every activation scale of the quantized model (``written``, read from it) is the one in
    ``saved``; a PrecisionError otherwise (ModelOpt calibrated anew instead of reusing the ranges)."""
    asked, used = _read_ranges(saved), _read_ranges(written)
    differ = sorted(t for t in used if asked.get(t) != used[t])
    if differ or not used:
        raise PrecisionError(f"INT8 quantization of {source} did not apply the saved activation ranges: "
                             f"{len(differ)} of {len(used)} scales differ (e.g. {differ[:1]})")
    return True


def _write_percentile_cache(model: Path, reader: CalibrationReader, cache: Path, work: Path) -> None:
    """Symmetric percentile ranges of every tensor, written as a TensorRT calibration cache."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(
        str(model), None, augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={"symmetric": True, "percentile": PERCENTILE},
    )
    calibrator.collect_data(reader)
    lines = ["TRT-100000-EntropyCalibration2"]
    for tensor, data in calibrator.compute_data().data.items():
        low, high = data.range_value
        amax = max(abs(float(np.min(low))), abs(float(np.max(high)))) or 1e-8
        lines.append(f"{tensor}: {struct.pack('!f', amax / 127.0).hex()}")
    cache.write_text("\n".join(lines) + "\n")


def _quantize_cpu(model: Path, output: Path, reader: CalibrationReader, method: str, exclude: list[str], work: Path,
                  weight_bits: int) -> None:
    """ONNX Runtime's static QDQ quantization; 7-bit weights (``reduce_range``: [-64, 64]) or 8-bit."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    quant_pre_process(str(model), str(prepared))
    quantize_static(
        str(prepared), str(output), reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=weight_bits == 7,  # weights only: activations keep all 8 bits
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[method],
        nodes_to_exclude=exclude,
        extra_options={"CalibPercentile": PERCENTILE},
    )
