"""Benchmark harness: latency and throughput per backend x precision x batch, checked against PyTorch.

Every row carries the speed (p50/p90/p99/mean latency, images/s) next to the agreement of its
outputs with PyTorch FP32 on the same batch, so a fast wrong artifact is visible. A backend that is
unavailable is a skipped row with the reason; one that fails mid-run is an error row, and the rest of
the matrix still runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import device
from .baseline import DEFAULT_MAX_REGRESSION
from .errors import OutputError, ResnetExportError, first_line
from .manifest import library_versions
from .models import LoadedModel
from .progress import task
from .verify import compare

if TYPE_CHECKING:
    from .trt import BatchProfile, RuntimeInfo

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: rows name their thread setting (threads_setting) and measure cores_busy; 3: fastest
BACKENDS = ("torch", "ort", "ort-openvino", "ort-cuda", "ort-trt", "trt", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")


class BenchError(ResnetExportError):
    """Bad benchmark options."""


@dataclass
class Settings:
    """How to time: warm-up runs, then ``iters`` runs or as many as fit in ``min_time`` seconds, spread over
    ``rounds`` interleaved rounds (each round times every row in turn for its share)."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 5
    iters: int | None = None
    min_time: float = 2.0
    threads: int | None = None
    rounds: int = 5


@dataclass
class Row:
    """One backend x precision x batch measurement (or the reason there is none)."""

    backend: str
    precision: str
    batch: int
    status: str = "ok"  # ok | skipped | error
    reason: str | None = None
    timing: str | None = None  # what the clock covers
    iterations: int = 0
    latency_ms: dict = field(default_factory=dict)  # p50, p90, p99, mean
    throughput: float | None = None  # images/s
    speedup_vs_torch: float | None = None
    top1_agreement: float | None = None
    max_abs_err: float | None = None
    #: the runner's thread setting as its library reports its configuration (a setting, not a measurement)
    threads_setting: int | str | None = None
    #: measured: the process's CPU seconds over wall seconds across the warm-up and timed runs (all threads)
    cores_busy: float | None = None
    #: the highest img/s of the rows of its precision and batch size timed end to end (wall clock), in this run
    fastest: bool = False


def parse_list(text: str, valid: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Split a comma-separated option; unknown names are a one-line error listing the valid ones."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in valid]
    if unknown or not items:
        raise BenchError(f"unknown {what} {', '.join(unknown) or repr(text)}; valid: {', '.join(valid)}")
    return items


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``1,8,32`` -> (1, 8, 32); anything but positive integers is a one-line error."""
    try:
        sizes = tuple(int(item) for item in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise BenchError(f"batch sizes must be positive integers, comma-separated; got '{text}'")
    return sizes


def latency_stats(seconds: list[float], batch: int) -> tuple[dict, float]:
    """Percentiles and mean in milliseconds, and throughput in images per second."""
    ms = np.asarray(seconds) * 1e3
    stats = {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
             "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}
    return stats, batch / (stats["mean"] / 1e3)


def time_calls(call: Callable[[], object], settings: Settings, clock: Callable[[Callable], float] | None = None,
               now: Callable[[], float] = time.perf_counter, minimum: int = 3) -> list[float]:
    """Warm up, then time ``call`` per iteration (``clock`` times one call; ``now``'s wall clock by default).

    ``now`` also bounds the loop to ``settings.min_time`` (at least ``minimum`` runs) unless ``settings.iters``
    is set.
    """
    clock = clock or functools.partial(_wall_clock, now=now)
    for _ in range(settings.warmup):
        call()
    timings: list[float] = []
    start = now()
    while True:
        timings.append(clock(call))
        if settings.iters is not None:
            if len(timings) >= settings.iters:
                break
        elif now() - start >= settings.min_time and len(timings) >= minimum:
            break
    return timings


def _wall_clock(call: Callable, now: Callable[[], float] = time.perf_counter) -> float:
    start = now()
    call()
    return now() - start


def _tensorrt_version() -> str | None:
    """The version of the ``tensorrt`` module Python imports (what the trt rows ran), if any."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def environment(threads: int | None) -> dict:
    """CPU (model, cores, INT8-relevant flags), GPU, requested threads and library versions of this run."""
    from .cpu import cpu_info

    info = cpu_info()
    versions = library_versions("torch", "onnxruntime-gpu", "onnxruntime", "tensorrt", "openvino", "nvidia-modelopt")
    gpu = device.current()
    return {
        "cpu": info["model"] or info["arch"],
        "arch": info["arch"],
        "cores": info["cores"],
        "cpu_flags": info["flags"],
        "threads_requested": threads,
        "gpu": gpu.identity()[0] if gpu.unavailable_reason() is None else None,
        "versions": {**versions, "tensorrt": _tensorrt_version() or versions.get("tensorrt")},
    }


# --------------------------------------------------------------------------- backends


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None."""
    import onnxruntime as ort
    import torch

    providers = ort.get_available_providers()
    if backend in ("ort-cuda", "ort-trt") and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in providers:
        return "ONNX Runtime has no CUDAExecutionProvider here"
    if backend == "ort-trt" and "TensorrtExecutionProvider" not in providers:
        return "ONNX Runtime has no TensorrtExecutionProvider here"
    if backend == "trt":
        from .trt import unavailable_reason

        return unavailable_reason()
    if backend == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "OpenVINO is not installed (pip install 'resnet-export[openvino]')"
    if backend == "ort-openvino":
        try:
            import onnxruntime_ep_openvino  # noqa: F401
        except ImportError:
            return "ONNX Runtime's OpenVINO plugin EP is not installed (pip install 'resnet-export[openvino]')"
    return None


def precision_unsupported(backend: str, precision: str) -> str | None:
    """Why a backend does not run a precision at all (a stated gap, never a silent one)."""
    import torch

    if backend == "torch" and precision == "int8":
        return "PyTorch eager has no INT8 inference path in this toolkit (use ort or trt)"
    if backend == "torch" and precision == "fp16" and not torch.cuda.is_available():
        return "PyTorch eager FP16 runs on the GPU only"
    return None


def artifact_key(loaded: LoadedModel, seed: int, opset: int | None = None) -> str:
    """A short hash of everything that defines the exported model.

    Source (arch, weights and their sha256), the factory file's content, the seed (random weights),
    preprocessing (input size) and the opset: a change in any of them never reuses another's ONNX.
    """
    from .export import DEFAULT_OPSET
    from .manifest import sha256_file
    from .models import model_files

    factory = loaded.source.get("factory", "")
    files = {f: sha256_file(f) for f in model_files(loaded) if factory.startswith(f)}  # weights: sha in source
    parts = [loaded.source, files, seed, loaded.preprocessing.to_dict(), opset or DEFAULT_OPSET]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Artifacts:
    """Builds or reuses the ONNX files and engines a matrix needs, under ``folder``."""

    def __init__(self, loaded: LoadedModel, folder: Path, calibration: np.ndarray, seed: int = 0):
        key = artifact_key(loaded, seed)
        self.folder = folder / f"{loaded.name.replace('/', '_').replace(':', '_')}-{key}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.loaded, self.calibration, self.seed = loaded, calibration, seed
        #: INT8 files carry their calibration data's hash, so other data never reuses them.
        self.calib_key = hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest()[:8]

    def onnx(self, precision: str, target: str) -> Path:
        """The ONNX for ``precision``; INT8 for ``target`` (cpu or trt), FP16/INT8 from the FP32 file.

        Each is made by the pipeline function its command uses, so it is verified and has a manifest;
        one is reused only when its manifest says it passed its gate. With random weights the INT8
        gate does not read top-1 agreement or accuracy (meaningless there); fidelity and the
        fused-vs-exact check still apply.
        """
        from .pipeline import PrecisionRequest, onnx_from_model, precision_from_onnx
        from .runners import TorchRunner

        fp32 = self.folder / "fp32.onnx"
        if not _passed(fp32):
            onnx_from_model(self.loaded, fp32, seed=self.seed)
        if precision == "fp32":
            return fp32
        path = self.folder / (f"int8-{target}-{self.calib_key}.onnx" if precision == "int8" else "fp16.onnx")
        if not _passed(path):
            calib = None
            if precision == "int8":
                calib = self.folder / f"calibration-{self.calib_key}.npy"
                np.save(calib, self.calibration)
            random_weights = precision == "int8" and self.loaded.source.get("weights") is None
            request = PrecisionRequest(precision, calib, target, calib_size=len(self.calibration), seed=self.seed,
                                       min_agreement=0.0 if random_weights else None,
                                       max_accuracy_drop=100.0 if random_weights else None)
            precision_from_onnx(fp32, path, request, reference=TorchRunner(self.loaded.module))
        return path

    def engine(self, precision: str, batch: int) -> tuple[Path, BatchProfile]:
        """The TensorRT plan that benchmarks ``precision`` at ``batch``, built for this TensorRT, GPU and platform,
        and its profile: batches 1 to ``batch``, tuned for ``batch`` (opt), so each row runs kernels chosen
        for its own batch."""
        from .pipeline import engine_from_onnx
        from .trt import BatchProfile, BuildOptions, runtime_info

        running = runtime_info()
        profile = BatchProfile(1, batch, batch)
        plan, cache = self.engine_files(precision, profile, running)
        if not self.reusable(plan, running):
            engine_from_onnx(self.onnx(precision, "trt"), plan, profile=profile,
                             options=BuildOptions(timing_cache=str(cache)))
        return plan, profile

    def engine_files(self, precision: str, profile: BatchProfile, running: RuntimeInfo) -> tuple[Path, Path]:
        """Where the plan of ``profile`` and the timing cache for ``running`` (``runtime_info()``) live.

        Both are named after the TensorRT version, GPU model, compute capability and platform
        (``engine_key``): a plan or cache from before an upgrade, or from another GPU sharing the
        folder, is never picked up.
        """
        from .trt import engine_key

        key = engine_key(running)
        suffix = f"-{self.calib_key}" if precision == "int8" else ""
        shape = f"b{profile.min}-{profile.opt}-{profile.max}"
        return self.folder / f"{precision}{suffix}-{shape}-{key}.plan", self.folder / f"timing-{key}.cache"

    @staticmethod
    def reusable(plan: Path, running: RuntimeInfo) -> bool:
        """Whether ``plan`` passed its gate when built and its manifest says it runs on ``running``."""
        from .trt import incompatibility, load_manifest

        return _passed(plan) and incompatibility(load_manifest(plan), running) is None


def _passed(artifact: Path) -> bool:
    """Whether ``artifact`` exists and its manifest records a passed verification."""
    from .pipeline import recorded_verification

    return artifact.is_file() and bool((recorded_verification(artifact) or {}).get("passed"))


#: (timing label, runner, device clock or None, the one batch it runs or None for every batch).
Timed = tuple[str, object, Callable | None, int | None]


def make_runners(backend: str, precision: str, artifacts: Artifacts, settings: Settings) -> list[Timed]:
    """The runners that time a backend x precision, each with its label and clock.

    With a device clock the runner's ``enqueue`` is timed on a batch already on the GPU: it queues the
    work and returns, and the clock's end event, recorded on the same stream, marks when the GPU is
    done; no host synchronization falls between the two events, for torch and TensorRT alike. The
    TensorRT backend has one plan per batch, its profile tuned for that batch and named in the label,
    and adds a second row per batch timed with host-device copies.
    """
    from .runners import OPENVINO_EP, OpenVinoRunner, OrtRunner, TorchRunner

    threads = settings.threads
    if backend == "torch":
        if precision == "fp32":
            return [("wall clock, CPU", TorchRunner(artifacts.loaded.module), None, None)]
        cuda = device.current()
        return [(f"{cuda.clock}, inputs on device", _TorchCudaRunner(artifacts.loaded.module), cuda.time, None)]
    if backend in ("ort", "ort-openvino"):
        target = "cpu" if precision == "int8" else "trt"
        provider = "CPUExecutionProvider" if backend == "ort" else OPENVINO_EP
        return [("wall clock, CPU", OrtRunner(artifacts.onnx(precision, target), [provider], threads), None, None)]
    if backend == "ort-cuda":
        return [("wall clock, with host-device copies",
                 OrtRunner(artifacts.onnx(precision, "trt"), ["CUDAExecutionProvider"], threads), None, None)]
    if backend == "ort-trt":
        return [("wall clock, with host-device copies",
                 OrtRunner(artifacts.onnx(precision, "trt"), ["TensorrtExecutionProvider", "CUDAExecutionProvider"], threads), None, None)]
    if backend == "trt":
        from .trt import TrtRunner

        timed: list[Timed] = []
        for batch in settings.batch_sizes:
            plan, profile = artifacts.engine(precision, batch)
            runner = TrtRunner(plan)
            shape = f"profile {profile.min}/{profile.opt}/{profile.max}"
            on_engine_stream = functools.partial(runner.device.time, stream=runner.stream)
            timed += [(f"{runner.device.clock} on the engine's stream, inputs on device, {shape}", runner,
                       on_engine_stream, batch),
                      (f"wall clock, with host-device copies, {shape}", runner, None, batch)]
        return timed
    if backend == "openvino":
        target = "cpu" if precision == "int8" else "trt"
        return [("wall clock, CPU", OpenVinoRunner(artifacts.onnx(precision, target), precision, threads), None, None)]
    raise BenchError(f"unknown backend {backend}")


class _TorchCudaRunner:
    """PyTorch eager FP16 on the GPU, inputs already on the device."""

    def __init__(self, module):
        import copy

        self.module = copy.deepcopy(module).half().cuda().eval()
        self.name = "torch-cuda-fp16"

    def enqueue(self, batch):
        """Queue the forward pass on torch's current stream; returns without waiting for the GPU."""
        import torch

        with torch.no_grad():
            return self.module(batch.half())

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self.enqueue(torch.from_numpy(batch).cuda()).float().cpu().numpy()


# --------------------------------------------------------------------------- the matrix


def run_matrix(
    loaded: LoadedModel,
    backends: tuple[str, ...],
    precisions: tuple[str, ...],
    settings: Settings,
    work: Path,
    calibration: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[list[Row], dict]:
    """Measure every backend x precision x batch; returns the rows and the environment.

    Every row's outputs are checked first; then the rows are timed in ``settings.rounds`` interleaved
    rounds, so that a slow spell of the machine falls on every row alike and the ratios between rows
    (speed-up over PyTorch eager) hold.
    """
    import torch
    from .runners import TorchRunner

    if settings.threads:
        torch.set_num_threads(settings.threads)
    rng = np.random.default_rng(seed)
    spec = loaded.preprocessing
    batches = {b: rng.standard_normal((b, spec.channels, *spec.input_size), dtype=np.float32)
               for b in settings.batch_sizes}
    if calibration is None:
        calibration = rng.standard_normal((64, spec.channels, *spec.input_size), dtype=np.float32)
    artifacts = Artifacts(loaded, work, calibration, seed)
    reference = TorchRunner(loaded.module)
    expected = {b: reference.infer(x) for b, x in batches.items()}
    rows: list[Row] = []
    slots: list[Slot] = []
    combos = [(b, p) for b in backends for p in precisions]
    with task(log, "Preparing the backends and checking their outputs", len(combos)) as advance:
        for backend, precision in combos:
            reason = backend_unavailable(backend) or precision_unsupported(backend, precision)
            if reason:
                rows += [Row(backend, precision, b, "skipped", reason) for b in settings.batch_sizes]
                advance()
                continue
            try:
                runners = make_runners(backend, precision, artifacts, settings)
            except Exception as exc:  # an artifact or session failed: an error row, the matrix goes on
                rows += [Row(backend, precision, b, "error", first_line(exc)) for b in settings.batch_sizes]
                advance()
                continue
            for batch in settings.batch_sizes:
                for label, runner, clock, only in runners:
                    if only in (None, batch):
                        slots.append(check(Row(backend, precision, batch, timing=label), runner, clock, batches[batch],
                                           expected[batch]))
                        rows.append(slots[-1].row)
            advance()
    time_rows(slots, settings)
    _add_speedups(rows)
    mark_fastest(rows)
    return rows, environment(settings.threads)


@dataclass
class Slot:
    """A row being measured: the call its rounds time (None once it failed), and what they timed."""

    row: Row
    call: Callable[[], object] | None
    clock: Callable | None = None
    timings: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


def check(row: Row, runner, clock, x: np.ndarray, expected: np.ndarray) -> Slot:
    """``row`` with its agreement with ``expected`` on ``x``, and the call that times it; a failure makes it
    an error row. With a device clock the call is the runner's ``enqueue`` on ``x`` uploaded once."""
    row.threads_setting = getattr(runner, "threads", None)
    try:
        metrics = compare(expected, runner.infer(x))
        row.top1_agreement, row.max_abs_err = metrics["top1_agreement"], metrics["max_abs_err"]
        if clock is not None:  # device-resident input; the runner's enqueue is what is timed, between events
            device_x = device.current().upload(x)
            return Slot(row, lambda: runner.enqueue(device_x), clock)
        return Slot(row, lambda: runner.infer(x))
    except Exception as exc:  # a backend that crashes is recorded, the rest still runs
        _failed(row, exc)
        return Slot(row, None)


def time_rows(slots: list[Slot], settings: Settings) -> None:
    """Time the slots in ``settings.rounds`` rounds, each timing every slot in turn for its share (the warm-up
    in the first round, one warm-up call after that), then fill each row's latency, throughput and cores busy."""
    live = [slot for slot in slots if slot.call is not None]
    rounds = max(1, settings.rounds)
    with task(log, f"Benchmark ({rounds} rounds)", rounds * len(live)) as advance:
        for index in range(rounds):
            iters = None if settings.iters is None else settings.iters // rounds + (index < settings.iters % rounds)
            share = Settings(warmup=settings.warmup if index == 0 else min(1, settings.warmup), iters=iters,
                             min_time=settings.min_time / rounds)
            for slot in live:
                if slot.call is not None and iters != 0:
                    _time_round(slot, share, minimum=-(-3 // rounds))
                advance()
    for slot in live:
        if slot.call is not None:
            slot.row.iterations = len(slot.timings)
            slot.row.latency_ms, slot.row.throughput = latency_stats(slot.timings, slot.row.batch)
            slot.row.cores_busy = round(slot.cpu_seconds / slot.wall_seconds, 2)


def _time_round(slot: Slot, share: Settings, minimum: int) -> None:
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    try:
        slot.timings += time_calls(slot.call, share, slot.clock, minimum=minimum)
    except Exception as exc:  # a backend that crashes mid-run is recorded, the rest still runs
        slot.call = None
        _failed(slot.row, exc)
    slot.cpu_seconds += time.process_time() - cpu_start
    slot.wall_seconds += time.perf_counter() - wall_start


def _failed(row: Row, exc: Exception) -> None:
    row.status, row.reason = "error", first_line(exc)
    log.warning(f"{row.backend} {row.precision} batch {row.batch} failed: {row.reason}")


def _add_speedups(rows: list[Row]) -> None:
    baseline = {r.batch: r.throughput for r in rows if r.backend == "torch" and r.precision == "fp32" and r.throughput}
    for row in rows:
        if row.throughput and baseline.get(row.batch):
            row.speedup_vs_torch = row.throughput / baseline[row.batch]


def _end_to_end(row: Row) -> bool:
    """Whether a row's clock covers a whole call from host memory to host memory (not device-only events)."""
    return row.status == "ok" and bool(row.throughput) and (row.timing or "").startswith("wall clock")


def mark_fastest(rows: list[Row]) -> None:
    """Mark, per precision and batch size, the row timed end to end with the highest img/s in this run."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        row.fastest = False
        if _end_to_end(row):
            groups.setdefault((row.precision, row.batch), []).append(row)
    for group in groups.values():
        max(group, key=lambda r: r.throughput or 0.0).fastest = True


def fastest_summary(rows: list[Row]) -> list[str]:
    """One line per precision and batch: the fastest backend and its margin over the next one, from the same run."""
    lines = []
    for best in (r for r in rows if r.fastest):
        others = sorted((r for r in rows if _end_to_end(r) and r is not best and r.precision == best.precision
                         and r.batch == best.batch), key=lambda r: -(r.throughput or 0.0))
        margin = (f"{best.throughput / others[0].throughput:.2f}x {others[0].backend}" if others
                  else "the only row")
        lines.append(f"- {best.precision} batch {best.batch}: **{best.backend}** ({best.throughput:.1f} img/s; {margin})")
    return lines


def prepare_report(folder: Path) -> None:
    """Create the report folder, or raise OutputError when it cannot be written (the CLI's check before any work)."""
    from .manifest import check_writable_dir

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"report directory {folder} is not writable ({exc.strerror})") from exc
    check_writable_dir(folder / "report.json")


def run_benchmark(loaded: LoadedModel, report: Path, backends: tuple[str, ...], precisions: tuple[str, ...],
                  settings: Settings, calib: Path | None = None, calib_size: int = 64, seed: int = 0,
                  baseline: Path | None = None, max_regression: float = DEFAULT_MAX_REGRESSION) -> tuple[dict[str, Path], object]:
    """``resnet-export bench``: run the matrix (INT8 calibrated on ``calib`` when given) and write the reports.

    Artifacts are built or reused under ``report/artifacts``. With ``baseline`` (a report.json, or a
    folder holding one per CPU class) the rows are compared with it (``baseline.compare_reports``) and
    the comparison goes into the reports. Returns the report paths by name and the comparison (or None).
    """
    from .baseline import compare_reports, find_baseline, load_report
    from .data import calibration_data

    calibration = None
    if calib:
        calibration = calibration_data(calib, loaded.preprocessing, calib_size, seed, held_out=False)[0].array
    rows, env = run_matrix(loaded, backends, precisions, settings, report / "artifacts", calibration, seed)
    comparison = None
    if baseline:
        found = find_baseline(baseline, loaded.name, env)
        if found is None:
            from .baseline import cpu_class

            log.warning(f"no baseline of {loaded.name} for CPU class {cpu_class(env)} in {baseline}: nothing compared")
        else:
            current = {"model": loaded.name, "weights": weights_kind(loaded), "environment": env,
                       "rows": [asdict(r) for r in rows]}
            comparison = compare_reports(current, load_report(found), str(found), max_regression)
    return write_reports(rows, env, loaded.name, report, comparison, weights_kind(loaded)), comparison


def weights_kind(loaded: LoadedModel) -> str:
    """``trained`` when the model was loaded with weights, else ``random``: top-1 agreement between backends
    means something only for the first (random logits are full of near-ties)."""
    return "random" if loaded.source.get("weights") is None else "trained"


# --------------------------------------------------------------------------- reports


def write_reports(rows: list[Row], env: dict, model: str, folder: Path, comparison=None,
                  weights: str | None = None) -> dict[str, Path]:
    """report.json, report.md, throughput.png and latency.png under ``folder`` (written atomically).

    ``comparison`` (a ``baseline.Comparison``) is recorded in report.json and appended to report.md.
    """
    from .manifest import atomic_output, write_json

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("report.json", "report.md", "throughput.png", "latency.png")}
    import datetime

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(paths["report.json"], {"schema_version": SCHEMA_VERSION, "model": model, "weights": weights,
                                      "created": created,
                                      "environment": env,
                                      "rows": [asdict(r) for r in rows],
                                      "compared_with": comparison.to_dict() if comparison else None})
    with atomic_output(paths["report.md"]) as tmp:
        tmp.write_text(markdown_report(rows, env, model) + (f"\n{comparison.markdown()}" if comparison else ""))
    for name, draw in (("throughput.png", _throughput_chart), ("latency.png", _latency_chart)):
        with atomic_output(paths[name]) as tmp:
            draw(rows, model, tmp)
    return paths


def markdown_report(rows: list[Row], env: dict, model: str) -> str:
    """A table a person can read: latency, throughput, speed-up over PyTorch eager, agreement."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"# Benchmark: {model}",
        "",
        f"CPU: {env['cpu']} ({env['cores']} cores; {' '.join(env['cpu_flags']) or 'no AVX2'}), threads requested: {env['threads_requested'] or 'library defaults'}, "
        f"GPU: {env['gpu'] or 'none'}",
        f"Versions: {versions}",
        "",
        "| backend | precision | batch | timing | threads set | cores busy | p50 ms | p90 ms | p99 ms | mean ms | img/s | vs torch fp32 | top-1 agree | max abs err |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.backend} | {r.precision} | {r.batch} | {r.status}: {r.reason} | | | | | | | | | | |")
            continue
        lat = r.latency_ms
        speedup = f"{r.speedup_vs_torch:.2f}x" if r.speedup_vs_torch else ""
        throughput = f"**{r.throughput:.1f}** (fastest)" if r.fastest else f"{r.throughput:.1f}"
        lines.append(
            f"| {r.backend} | {r.precision} | {r.batch} | {r.timing} | {r.threads_setting if r.threads_setting is not None else ''} | "
            f"{r.cores_busy:.2f} | "
            f"{lat['p50']:.2f} | {lat['p90']:.2f} | "
            f"{lat['p99']:.2f} | {lat['mean']:.2f} | {throughput} | {speedup} | {r.top1_agreement:.1%} | "
            f"{r.max_abs_err:.3g} |"
        )
    summary = fastest_summary(rows)
    if summary:
        lines += ["", "Fastest backend per precision and batch size (end-to-end timings of this run; "
                  "the margin is over the next backend):", *summary]
    return "\n".join(lines) + "\n"


def _series(rows: list[Row]) -> dict[str, list[Row]]:
    series: dict[str, list[Row]] = {}
    for r in rows:
        if r.status == "ok":
            series.setdefault(f"{r.backend} {r.precision} ({r.timing})", []).append(r)
    return series


def _throughput_chart(rows: list[Row], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in _series(rows).items():
        ax.plot([r.batch for r in points], [r.throughput for r in points], marker="o", label=label)
    ax.set(xlabel="batch size", ylabel="images / s", title=f"{model}: throughput")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(sorted({r.batch for r in rows}), labels=[str(b) for b in sorted({r.batch for r in rows})])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _latency_chart(rows: list[Row], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(ok)), 5))
    x = np.arange(len(ok))
    for offset, key in zip((-0.25, 0, 0.25), ("p50", "p90", "p99")):
        ax.bar(x + offset, [r.latency_ms[key] for r in ok], width=0.25, label=key)
    ax.set_xticks(x, labels=[f"{r.backend}\n{r.precision} b{r.batch}" for r in ok], fontsize=7)
    ax.set(ylabel="latency (ms)", title=f"{model}: latency percentiles", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
