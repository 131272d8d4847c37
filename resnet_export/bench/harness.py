"""Benchmark harness: latency and throughput per backend x precision x batch, checked against PyTorch.

Every row carries the speed (p50/p90/p99/mean latency, images/s) next to the agreement of its
outputs with PyTorch FP32 on the same batch, so a fast wrong artifact is visible. A backend that is
unavailable is a skipped row with the reason; one that fails mid-run is an error row, and the rest of
the matrix still runs.

Every row says the device it ran on and its clock. Its speed-up divides by PyTorch FP32 on the same
device (a GPU row by PyTorch on that GPU, a CPU row by PyTorch on the CPU), never by a row of another
device; ``speedup_vs_best_torch`` divides by the fastest PyTorch row of its device (eager or compiled,
any precision). Reports are written by ``bench.report``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..runtime import device
from .baseline import DEFAULT_MAX_REGRESSION
from ..errors import OutputError, ResnetExportError, first_line
from ..manifest import library_versions
from ..source.models import LoadedModel
from ..progress import task
from ..checks.verify import compare, covering
from .rows import Row, WALL_CLOCK, fastest_groups

if TYPE_CHECKING:
    from .artifacts import Artifacts

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-compile", "ort", "ort-openvino", "ort-cuda", "ort-trt", "trt", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: Backends that run on the CPU whatever the machine has: they need PyTorch on the CPU as their baseline.
CPU_BACKENDS = ("ort", "ort-openvino", "openvino")
TORCH_BACKENDS = ("torch", "torch-compile")
#: Seeded random inputs INT8 rows are calibrated on when no calibration images are given.
RANDOM_CALIBRATION = 64
#: Calls a device clock times back to back per sample (``CudaDevice.time``): the queue stays full between them.
DEVICE_CALLS = 10


class BenchError(ResnetExportError):
    """Bad benchmark options."""


@dataclass
class Settings:
    """How to time: warm-up runs, then ``iters`` runs or as many as fit in ``min_time`` seconds, spread over
    ``rounds`` interleaved rounds (each round times every row in turn for its share).

    ``tf32``: ONNX Runtime's and TensorRT's FP32 rows on the GPU may use TF32 (off by default: FP32 computes in
    FP32); PyTorch FP32 on the GPU runs both as PyTorch does by default (TF32 convolutions, the baseline) and strict
    (TF32 off). ``cuda_graph``:
    TensorRT rows are also timed replaying a CUDA graph. ``streams``: rows on the GPU are also timed with this
    many runners, each on its own stream and thread, as a server runs them.
    """

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 5
    iters: int | None = None
    min_time: float = 2.0
    threads: int | None = None
    rounds: int = 5
    tf32: bool = False
    cuda_graph: bool = False
    streams: int = 1


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


def time_calls(call: Callable[[], object], settings: Settings, clock: Callable[[Callable], list[float]] | None = None,
               now: Callable[[], float] = time.perf_counter, minimum: int = 3) -> list[float]:
    """Warm up, then time ``call`` per iteration (``clock`` times one or more calls and returns each one's seconds;
    ``now``'s wall clock, one call at a time, by default).

    ``now`` also bounds the loop to ``settings.min_time`` (at least ``minimum`` runs) unless ``settings.iters``
    is set (then exactly that many are kept).
    """
    clock = clock or functools.partial(_wall_clock, now=now)
    for _ in range(settings.warmup):
        call()
    timings: list[float] = []
    start = now()
    while True:
        timings += clock(call)
        if settings.iters is not None:
            if len(timings) >= settings.iters:
                return timings[:settings.iters]
        elif now() - start >= settings.min_time and len(timings) >= minimum:
            return timings


def _wall_clock(call: Callable, now: Callable[[], float] = time.perf_counter) -> list[float]:
    start = now()
    call()
    return [now() - start]


def time_concurrently(calls: list[Callable[[], object]], settings: Settings, minimum: int = 3) -> tuple[list[float], float]:
    """Run each call in a thread of its own at the same time, each as ``time_calls`` would (wall clock per call);
    returns every call's latency and the wall seconds from the common start to the last thread's end."""
    barrier = threading.Barrier(len(calls) + 1)
    results: list[list[float]] = [[] for _ in calls]
    errors: list[BaseException] = []

    def worker(index: int, call: Callable[[], object]) -> None:
        try:
            for _ in range(settings.warmup):
                call()
            barrier.wait()
            results[index] = time_calls(call, Settings(warmup=0, iters=settings.iters, min_time=settings.min_time),
                                        minimum=minimum)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [t for timings in results for t in timings], time.perf_counter() - start


def _tensorrt_version() -> str | None:
    """The version of the ``tensorrt`` module Python imports (what the trt rows ran), if any."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def environment(settings: Settings) -> dict:
    """CPU (model, cores, INT8-relevant flags), GPU, requested threads and TF32, and library versions of this run."""
    from ..cpu import cpu_info

    info = cpu_info()
    versions = library_versions("torch", "onnxruntime-gpu", "onnxruntime", "tensorrt", "openvino", "nvidia-modelopt")
    gpu = device.current()
    return {
        "cpu": info["model"] or info["arch"],
        "arch": info["arch"],
        "cores": info["cores"],
        "cpu_flags": info["flags"],
        "threads_requested": settings.threads,
        "gpu": gpu.identity()[0] if gpu.unavailable_reason() is None else None,
        "tf32_allowed": settings.tf32,
        "versions": {**versions, "tensorrt": _tensorrt_version() or versions.get("tensorrt")},
    }


# --------------------------------------------------------------------------- backends


def gpu_name() -> str | None:
    """The name of the GPU the device rows run on, or None where there is none."""
    gpu = device.current()
    return gpu.identity()[0] if gpu.unavailable_reason() is None else None


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None."""
    import onnxruntime as ort
    import torch

    providers = ort.get_available_providers()
    if backend in ("ort-cuda", "ort-trt") and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if backend == "ort-cuda" and "CUDAExecutionProvider" not in providers:
        return "ONNX Runtime has no CUDAExecutionProvider here (it comes with the onnxruntime-gpu package)"
    if backend == "ort-trt" and "TensorrtExecutionProvider" not in providers:
        return "ONNX Runtime has no TensorrtExecutionProvider here"
    if backend == "trt":
        from ..engine.tensorrt import unavailable_reason

        return unavailable_reason()
    if backend == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "OpenVINO is not installed (pip install openvino)"
    if backend == "ort-openvino":
        from ..runtime.runners import openvino_ep_unavailable

        return openvino_ep_unavailable()
    return None


def precision_unsupported(backend: str, precision: str) -> str | None:
    """Why a backend does not run a precision at all (a stated gap, never a silent one)."""
    on_gpu = gpu_name() is not None
    if backend in TORCH_BACKENDS and precision == "int8":
        return "PyTorch has no INT8 inference path in this toolkit (use ort or trt)"
    if backend == "torch" and precision in ("fp16", "bf16") and not on_gpu:
        return "PyTorch FP16 and BF16 rows run on the GPU only"
    if backend == "torch-compile" and on_gpu and precision == "fp32":
        return "on the GPU torch-compile rows are FP16 and BF16 (channels_last); PyTorch FP32 is the eager baseline"
    if backend == "torch-compile" and not on_gpu and precision != "fp32":
        return "on the CPU torch-compile rows are FP32 (FP16 and BF16 on the GPU)"
    if backend not in TORCH_BACKENDS and precision == "bf16":
        return "the toolkit makes no BF16 ONNX or plan: BF16 rows are PyTorch's"
    return None


@dataclass
class Timed:
    """A runner one row times, and how.

    With ``device_clock`` (``runtime.device``'s ``time`` on the runner's stream) the runner's ``enqueue`` is timed on an
    input already on the GPU: it queues the work and returns, and the clock's end event, recorded on the same
    stream, marks when the GPU is done. Without, the wall clock times ``infer`` from host memory to host memory.
    """

    label: str
    runner: object
    device_clock: Callable | None = None
    batch: int | None = None  # the one batch it runs (a TensorRT plan per batch), or None for every batch
    device: str = "cpu"
    tf32: bool | None = None
    cuda_graph: bool = False  # the label says it replays a CUDA graph: the runner must still do so after its check


def _on_device(runner, what: str) -> Timed:
    """A row timed with the device's clock on ``runner.stream``, on an input already on the device."""
    gpu = device.current()
    return Timed(f"{gpu.clock} on the runner's stream, inputs on device, {what}", runner,
                 functools.partial(gpu.time, stream=runner.stream, calls=DEVICE_CALLS), None, gpu.identity()[0],
                 cuda_graph=getattr(runner, "cuda_graph", False))


def make_runners(backend: str, precision: str, artifacts: Artifacts, settings: Settings,
                 cpu_baseline: bool = True) -> list[Timed]:
    """The runners that time a backend x precision, each with its label, clock and device.

    PyTorch FP32 runs on the GPU where one is visible, and on the CPU too when ``cpu_baseline`` (CPU rows need
    it as their baseline). ONNX Runtime's CUDA provider gets a row with host-device copies and one with its
    input and output on the device. TensorRT has one plan per batch, its profile tuned for that batch and
    named in the label, timed on the device, with copies, and replaying a CUDA graph (``settings.cuda_graph``).
    """
    from ..runtime.runners import OPENVINO_EP, OpenVinoRunner, OrtRunner, TorchRunner

    threads, gpu = settings.threads, gpu_name()
    fp32_tf32 = settings.tf32 if precision == "fp32" else None
    if backend in TORCH_BACKENDS:
        from ..runtime.device_runners import TorchDeviceRunner

        compiled = backend == "torch-compile"
        timed = []
        # FP32 on the GPU: as PyTorch runs it by default (TF32 convolutions), the baseline, and strict (TF32 off)
        for allow in ((None, False) if gpu and precision == "fp32" else (None,) if gpu else ()):
            runner = TorchDeviceRunner(artifacts.loaded.module, precision, compiled=compiled, allow_tf32=allow)
            timed.append(_on_device(runner, runner.settings()))
            timed[-1].tf32 = (allow is not False) if precision == "fp32" else None
        if precision == "fp32" and (not gpu or (cpu_baseline and not compiled)):
            label = "wall clock, CPU" + (", torch.compile (inductor)" if compiled else "")
            timed.append(Timed(label, TorchRunner(artifacts.loaded.module, compiled=compiled)))
        return timed
    if backend in ("ort", "ort-openvino"):
        target = "cpu" if precision == "int8" else "trt"
        provider = "CPUExecutionProvider" if backend == "ort" else OPENVINO_EP
        return [Timed("wall clock, CPU", OrtRunner(artifacts.onnx(precision, target), [provider], threads))]
    if backend == "ort-cuda":
        from ..runtime.device_runners import ORT_CUDA_INT8, OrtDeviceRunner

        path = artifacts.onnx(precision, "trt")
        what = f"{ORT_CUDA_INT8}, " if precision == "int8" else ""
        copies = OrtRunner(path, ["CUDAExecutionProvider"], threads,
                           provider_options={"use_tf32": str(int(settings.tf32)), "prefer_nhwc": "1"})
        timed = [Timed(f"wall clock, with host-device copies, {what}NHWC, TF32 {'on' if settings.tf32 else 'off'}",
                       copies, None, None, gpu, fp32_tf32)]
        for cuda_graph in (False, True):  # the same graph as the copies row: the artifact's own
            bound = OrtDeviceRunner(path, allow_tf32=settings.tf32, cuda_graph=cuda_graph)
            timed.append(_on_device(bound, what + bound.settings()))
            timed[-1].tf32 = fp32_tf32
        return timed
    if backend == "ort-trt":
        return [Timed("wall clock, with host-device copies",
                      OrtRunner(artifacts.onnx(precision, "trt"), ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
                                threads), None, None, gpu)]
    if backend == "trt":
        timed: list[Timed] = []
        for batch in settings.batch_sizes:
            plan, profile = artifacts.engine(precision, batch, settings.tf32)
            timed += plan_runners(plan, f"profile {profile.min}/{profile.opt}/{profile.max}", batch, settings)
        return timed
    if backend == "openvino":
        target = "cpu" if precision == "int8" else "trt"
        return [Timed("wall clock, CPU", OpenVinoRunner(artifacts.onnx(precision, target), precision, threads))]
    raise BenchError(f"unknown backend {backend}")


def plan_runners(plan: Path, shape: str, batch: int | None, settings: Settings, manifest: dict | None = None) -> list[Timed]:
    """A plan's rows as trtexec times an engine: on the engine's stream with the input on the device (and,
    with ``settings.cuda_graph``, replaying a CUDA graph, trtexec's ``--useCudaGraph``), and with copies."""
    from ..engine.runner import TrtRunner

    gpu = device.current()
    name = gpu.identity()[0]
    graphs = [False, True] if settings.cuda_graph else [False]
    timed = []
    for cuda_graph in graphs:
        runner = TrtRunner(plan, cuda_graph=cuda_graph, manifest=manifest)
        what = "CUDA graph, " if cuda_graph else ""
        built = runner.manifest or {}
        tf32 = (built.get("options") or {}).get("tf32") if (built.get("precision") or {}).get("dtype") == "fp32" else None
        label = ("" if tf32 is None else f"TF32 {'on' if tf32 else 'off'}, ") + shape
        timed.append(Timed(f"{gpu.clock} on the engine's stream, inputs on device, {what}{label}", runner,
                           functools.partial(gpu.time, stream=runner.stream, calls=DEVICE_CALLS), batch, name, tf32,
                           cuda_graph))
    timed.append(Timed(f"wall clock, with host-device copies, {label}", timed[0].runner, None, batch, name, tf32))
    return timed


# --------------------------------------------------------------------------- the matrix


def run_matrix(
    loaded: LoadedModel,
    backends: tuple[str, ...],
    precisions: tuple[str, ...],
    settings: Settings,
    work: Path,
    calibration: np.ndarray | None = None,
    seed: int = 0,
    after_each: Callable[[list[Row]], bool] | None = None,
    order: list[tuple[str, str]] | None = None,
) -> tuple[list[Row], dict]:
    """Measure every backend x precision x batch, in that order; returns the rows and the environment.

    Every row's outputs are checked against PyTorch FP32 and held to the gate of its precision and weights
    (``Row.gate``). Then the rows are timed in ``settings.rounds`` interleaved rounds, so that a slow spell of the
    machine falls on every row alike and the ratios between rows (speed-up over PyTorch FP32 on the same device)
    hold. With ``after_each``, each backend x precision is checked and timed before the next is prepared, and
    ``after_each(rows so far)`` is called after it (a report written as the run goes; ``gpu_check``); when it
    returns False the rest is not measured. ``order``: the backend x precision pairs to measure, in this order,
    instead of every backend x precision.
    """
    import torch
    from ..runtime.runners import TorchRunner

    if settings.threads:
        torch.set_num_threads(settings.threads)
    rng = np.random.default_rng(seed)
    spec = loaded.preprocessing
    batches = {b: rng.standard_normal((b, spec.channels, *spec.input_size), dtype=np.float32)
               for b in settings.batch_sizes}
    if calibration is None:
        calibration = rng.standard_normal((RANDOM_CALIBRATION, spec.channels, *spec.input_size), dtype=np.float32)
    from .artifacts import Artifacts

    artifacts = Artifacts(loaded, work, calibration, seed)
    reference = TorchRunner(loaded.module)
    expected = {b: reference.infer(x) for b, x in batches.items()}
    combos = order or [(b, p) for b in backends for p in precisions]
    cpu_baseline = gpu_name() is None or any(b in CPU_BACKENDS for b, _ in combos)
    random_weights = weights_kind(loaded) == "random"
    rows: list[Row] = []
    slots: list[Slot] = []
    with task(log, "Preparing the backends and checking their outputs", len(combos)) as advance:
        for backend, precision in combos:
            new = _check_combo(backend, precision, artifacts, settings, cpu_baseline, batches, expected, random_weights)
            rows += [slot.row if isinstance(slot, Slot) else slot for slot in new]
            new_slots = [slot for slot in new if isinstance(slot, Slot)]
            advance()
            if after_each is None:
                slots += new_slots
                continue
            time_rows(new_slots, settings)
            add_speedups(rows)
            mark_fastest(rows)
            if not after_each(rows):
                break
    time_rows(slots, settings)
    add_speedups(rows)
    mark_fastest(rows)
    return rows, environment(settings)


def _check_combo(backend: str, precision: str, artifacts: Artifacts, settings: Settings, cpu_baseline: bool,
                 batches: dict[int, np.ndarray], expected: dict[int, np.ndarray], random_weights: bool) -> list:
    """One backend x precision: a checked slot per row that runs, or a skipped or error ``Row`` per batch."""
    reason = backend_unavailable(backend) or precision_unsupported(backend, precision)
    if reason:
        return [Row(backend, precision, b, "skipped", reason) for b in settings.batch_sizes]
    try:
        runners = make_runners(backend, precision, artifacts, settings, cpu_baseline)
    except Exception as exc:  # an artifact or session failed: an error row, the matrix goes on
        return [Row(backend, precision, b, "error", first_line(exc)) for b in settings.batch_sizes]
    return [slot for batch in settings.batch_sizes for slot in check_runners(
        backend, precision, batch, runners, batches[batch], expected[batch], settings, random_weights=random_weights)]


def check_runners(backend: str, precision: str, batch: int, runners: list[Timed], x: np.ndarray,
                  expected: np.ndarray | None, settings: Settings, note: str | None = None,
                  random_weights: bool | None = None) -> list[Slot]:
    """The checked slots of one backend x precision at ``batch``: a row per runner that runs it and, for rows on
    the device with ``settings.streams`` > 1, a row of that many runners timed at once. ``random_weights``: which
    gate the outputs are held to (None: not gated)."""
    slots = []
    for timed in runners:
        if timed.batch not in (None, batch):
            continue
        row = Row(backend, precision, batch, timing=timed.label, device=timed.device, tf32=timed.tf32, note=note,
                  clock=device.current().clock if timed.device_clock else WALL_CLOCK)
        slots.append(check(row, timed.runner, timed.device_clock, x, expected, random_weights))
        if timed.cuda_graph and not timed.runner.cuda_graph and slots[-1].call is not None:
            slots[-1].call = None  # its capture failed and it runs plain enqueues: not what the label says
            _failed(row, RuntimeError("its CUDA graph capture failed (see the warning above): not timed"))
        if settings.streams > 1 and timed.device_clock and slots[-1].call is not None:
            slots.append(check_streams(row, timed.runner, settings.streams, x, expected, random_weights))
    return slots


@dataclass
class Slot:
    """A row being measured: the call its rounds time (None once it failed), and what they timed.

    ``calls`` (several streams) are timed at once, each in a thread of its own; ``concurrent_seconds`` is the
    wall time they ran, which the row's throughput divides its images by.
    """

    row: Row
    call: Callable[[], object] | None
    clock: Callable | None = None
    timings: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    calls: list[Callable[[], object]] | None = None
    concurrent_seconds: float = 0.0


def check(row: Row, runner, clock, x: np.ndarray, expected: np.ndarray | None,
          random_weights: bool | None = None) -> Slot:
    """``row`` with its agreement with ``expected`` on ``x``, and the call that times it; a failure makes it
    an error row. With a device clock the call is the runner's ``enqueue`` on ``x`` uploaded once. Without
    ``expected`` the outputs are not checked (the row's ``note`` says why). ``random_weights`` (None: not gated)
    chooses the gate the outputs are held to (``gate_row``)."""
    row.threads_setting = getattr(runner, "threads", None)
    try:
        outputs = runner.infer(x)
        if expected is not None:
            metrics = compare(expected, outputs)
            row.top1_agreement, row.max_abs_err = metrics["top1_agreement"], metrics["max_abs_err"]
            gate_row(row, metrics, random_weights)
        row.compile_seconds = getattr(runner, "compile_seconds", {}).get(tuple(x.shape))
        if clock is not None:  # device-resident input; the runner's enqueue is what is timed, between events
            device_x = device.current().upload(x)
            return Slot(row, lambda: runner.enqueue(device_x), clock)
        return Slot(row, lambda: runner.infer(x))
    except Exception as exc:  # a backend that crashes is recorded, the rest still runs
        _failed(row, exc)
        return Slot(row, None)


def gate_row(row: Row, metrics: dict, random_weights: bool | None) -> None:
    """Hold ``row``'s outputs to the gate of its precision and weights (one input's top-1 flip allowed, as a plan's:
    another kernel rounds differently); an FP32 row that may use TF32 gets FP16's gate. Keeps the worst verdict."""
    from ..checks.verify import gate_failures, plan_gate

    if random_weights is None:
        return
    gate = plan_gate(row.precision, random_weights, tf32=bool(row.tf32))
    failures = gate_failures(metrics, gate, slack=1, distinct=row.batch)
    if failures or row.gate is None:
        row.gate = "; ".join(failures) or "passed"


def check_streams(single: Row, runner, streams: int, x: np.ndarray, expected: np.ndarray | None,
                  random_weights: bool | None = None) -> Slot:
    """The row of ``streams`` runners (``runner`` and clones, each on its own stream) timed at once, as a server
    runs them: one thread per runner, per-request wall-clock latency, aggregate images/s. Every runner's
    outputs are checked; the row keeps the worst agreement."""
    row = Row(single.backend, single.precision, single.batch, device=single.device, tf32=single.tf32,
              streams=streams, clock=f"{WALL_CLOCK}, {streams} streams", note=single.note,
              timing=f"wall clock per request, {streams} streams (a runner and thread each), "
                     + single.timing.split("inputs on device, ", 1)[-1])
    try:
        runners = [runner] + [runner.clone() for _ in range(streams - 1)]
        device_x = device.current().upload(x)
        if expected is not None:
            metrics = [compare(expected, r.infer(x)) for r in runners]
            row.top1_agreement = min(m["top1_agreement"] for m in metrics)
            row.max_abs_err = max(m["max_abs_err"] for m in metrics)
            for m in metrics:
                gate_row(row, m, random_weights)
        return Slot(row, runners[0].infer_device, calls=[functools.partial(r.infer_device, device_x) for r in runners])
    except Exception as exc:  # a backend that cannot run several at once is recorded, the rest still runs
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
            if slot.calls:  # several streams: the images they all finished over the time they ran together
                slot.row.throughput = len(slot.timings) * slot.row.batch / slot.concurrent_seconds
            slot.row.cores_busy = round(slot.cpu_seconds / slot.wall_seconds, 2)


def _time_round(slot: Slot, share: Settings, minimum: int) -> None:
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    try:
        if slot.calls:
            timings, seconds = time_concurrently(slot.calls, share, minimum)
            slot.timings += timings
            slot.concurrent_seconds += seconds
        else:
            slot.timings += time_calls(slot.call, share, slot.clock, minimum=minimum)
    except Exception as exc:  # a backend that crashes mid-run is recorded, the rest still runs
        slot.call = None
        _failed(slot.row, exc)
    slot.cpu_seconds += time.process_time() - cpu_start
    slot.wall_seconds += time.perf_counter() - wall_start


def _failed(row: Row, exc: Exception) -> None:
    row.status, row.reason = "error", first_line(exc)
    log.warning(f"{row.backend} {row.precision} batch {row.batch} failed: {row.reason}")


def row_name(row: Row) -> str:
    """A row as the report names it: ``torch fp32 b8 on NVIDIA H200 (CUDA events)``."""
    streams = f", {row.streams} streams" if row.streams > 1 else ""
    return f"{row.backend} {row.precision} b{row.batch} on {row.device} ({row.clock.split(',')[0]}{streams})"


def add_speedups(rows: list[Row]) -> None:
    """Divide each row's img/s by PyTorch FP32's on the same device and batch (``speedup_vs_torch``, ``baseline``),
    and each non-PyTorch row's by the fastest PyTorch row of its device and batch (``speedup_vs_best_torch``).
    A row whose device has no such PyTorch row in this run gets none: never a row of another device."""
    timed = [r for r in rows if r.status == "ok" and r.throughput and r.streams == 1]
    # strict FP32 (TF32 off on a GPU) is a fidelity reference, not what a PyTorch user runs
    baselines = {(r.device, r.batch): r for r in timed if r.backend == "torch" and r.precision == "fp32"
                 and r.tf32 is not False}
    best: dict[tuple[str, int], Row] = {}
    for row in (r for r in timed if r.backend in TORCH_BACKENDS):
        key = (row.device, row.batch)
        if key not in best or row.throughput > best[key].throughput:
            best[key] = row
    for row in rows:
        if not row.throughput:
            continue
        if (base := baselines.get((row.device, row.batch))) is not None:
            row.speedup_vs_torch, row.baseline = row.throughput / base.throughput, row_name(base)
        if row.backend not in TORCH_BACKENDS and (top := best.get((row.device, row.batch))) is not None:
            row.speedup_vs_best_torch, row.best_torch = row.throughput / top.throughput, row_name(top)


def mark_fastest(rows: list[Row]) -> None:
    """Mark, per precision, batch size and clock, the row with the highest img/s in this run."""
    for row in rows:
        row.fastest = False
    for group in fastest_groups(rows).values():
        max(group, key=lambda r: r.throughput or 0.0).fastest = True


# --------------------------------------------------------------------------- a plan you bring


def plan_reference(manifest: dict | None, seed: int = 0):
    """What a plan's outputs are checked against, from its manifest: the inputs and logits its ONNX recorded (else
    that ONNX on ONNX Runtime, ``pipeline.recorded_reference``); returns the inputs and logits (None when nothing
    can be) and what they are in words."""
    from ..pipeline import recorded_reference

    if manifest is None:
        return None, "outputs not checked: the plan has no manifest, so nothing says which model it is"
    onnx = Path(manifest.get("onnx", ""))
    if not onnx.is_file():
        return None, f"outputs not checked: its ONNX {onnx} (named by its manifest) is not here"
    inputs, logits, described = recorded_reference(onnx, seed=seed)
    return (inputs, logits), f"checked against {described}"


def run_plan(plan: Path, settings: Settings, seed: int = 0) -> tuple[list[Row], dict]:
    """Time a plan you bring (trtexec's ``--loadEngine``) at each of ``settings.batch_sizes`` inside its profile.

    Its precision and reference come from its manifest (``plan_reference``); batches outside its profile are
    skipped rows. No PyTorch row runs, so the rows carry no speed-up.
    """
    from ..engine.runner import TrtRunner
    from ..engine.tensorrt import load_manifest, require_tensorrt

    require_tensorrt(f"run {plan}")
    manifest = load_manifest(plan)
    precision = ((manifest or {}).get("precision") or {}).get("dtype", "unknown")
    probe = TrtRunner(plan, manifest=manifest)
    low, high = probe.profile_min_batch, probe.profile_max_batch
    reference, said = plan_reference(manifest, seed)
    log.info(f"{plan.name}: {said}")
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    slots: list[Slot] = []
    with task(log, f"Checking {plan.name}", len(settings.batch_sizes)) as advance:
        for batch in settings.batch_sizes:
            if not low <= batch <= high:
                rows.append(Row("trt", precision, batch, "skipped", f"outside the plan's profile (batch {low} to {high})"))
                advance()
                continue
            x, expected = rng.standard_normal((batch, *probe.input_chw), dtype=np.float32), None
            if reference is not None:  # the recorded inputs, repeated to fill the batch, and their logits
                inputs, expected = covering(reference[0], [batch], reference[1])
                x, expected = inputs.array[:batch], expected[:batch]
            runners = plan_runners(plan, f"profile {low}/{probe.profile_opt_batch}/{high}", batch, settings, manifest)
            new = check_runners("trt", precision, batch, runners, x, expected, settings, note=f"{plan.name}: {said}")
            slots += new
            rows += [slot.row for slot in new]
            advance()
    time_rows(slots, settings)
    mark_fastest(rows)
    return rows, environment(settings)


# --------------------------------------------------------------------------- the command


def prepare_report(folder: Path) -> None:
    """Create the report folder, or raise OutputError when it cannot be written (the CLI's check before any work)."""
    from ..manifest import check_writable_dir

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"report directory {folder} is not writable ({exc.strerror})") from exc
    check_writable_dir(folder / "report.json")


def run_benchmark(loaded: LoadedModel | None, report: Path, backends: tuple[str, ...], precisions: tuple[str, ...],
                  settings: Settings, calib: Path | None = None, calib_size: int = 64, seed: int = 0,
                  baseline: Path | None = None, max_regression: float = DEFAULT_MAX_REGRESSION,
                  plan: Path | None = None, allow_failed: bool = False) -> tuple[dict[str, Path], object]:
    """``resnet-export bench``: run the matrix (INT8 calibrated on ``calib`` when given) and write the reports.

    Artifacts are built or reused under ``report/artifacts``. ``plan`` times that plan alone instead of the
    matrix of ``loaded`` (``run_plan``). With ``baseline`` (a report.json, or a folder holding one per CPU
    class) the rows are compared with it (``baseline.compare_reports``) and the comparison goes into the
    reports. A ``plan`` whose manifest says it failed its gate is refused unless ``allow_failed``. Returns the report
    paths by name and the comparison (or None).
    """
    from .baseline import compare_reports, find_baseline, load_report
    from .report import write_reports
    from ..data import calibration_data

    if plan is not None:
        from ..checks.serving import check_served

        check_served(plan, allow_failed)  # served = verified: a plan that failed its gate is not timed as a product
        rows, env = run_plan(plan, settings, seed)
        name, weights = plan.name, None
    else:
        assert loaded is not None
        calibration = None
        if calib:
            calibration = calibration_data(calib, loaded.preprocessing, calib_size, seed, held_out=False)[0].array
        rows, env = run_matrix(loaded, backends, precisions, settings, report / "artifacts", calibration, seed)
        if "int8" in precisions:
            env["int8"] = int8_forms(f"{len(calibration)} images from {calib}" if calib is not None
                                     else f"{RANDOM_CALIBRATION} seeded random inputs (no calibration images given)")
        name, weights = loaded.name, weights_kind(loaded)
    comparison = None
    if baseline:
        found = find_baseline(baseline, name, env)
        if found is None:
            from .baseline import cpu_class

            log.warning(f"no baseline of {name} for CPU class {cpu_class(env)} in {baseline}: nothing compared")
        else:
            current = {"model": name, "weights": weights, "environment": env, "rows": [asdict(r) for r in rows]}
            comparison = compare_reports(current, load_report(found), str(found), max_regression)
    return write_reports(rows, env, name, report, comparison, weights), comparison


def int8_forms(calibration: str) -> str:
    """What the benchmark's INT8 rows run, in words: each target's quantization, as ``quantize`` makes it by default."""
    return (f"cpu target (ort, ort-openvino, openvino rows): ONNX Runtime QDQ, uint8 activations, 7-bit per-channel "
            f"weights (portable), minmax ranges; trt target (ort-cuda, trt rows): ModelOpt Q/DQ, entropy ranges, rest "
            f"auto; calibrated on {calibration}")


def weights_kind(loaded: LoadedModel) -> str:
    """``trained`` when the model was loaded with weights, else ``random``: top-1 agreement between backends
    means something only for the first (random logits are full of near-ties)."""
    return "random" if loaded.source.get("weights") is None else "trained"
