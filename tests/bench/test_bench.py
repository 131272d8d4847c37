"""The benchmark harness on a tiny model: rows, stated gaps, error rows, reports."""

import json
import shutil

import numpy as np
import pytest

from resnet_export.bench.artifacts import Artifacts
from resnet_export.bench.harness import (
    BenchError,
    Settings,
    latency_stats,
    parse_batch_sizes,
    parse_list,
    run_matrix,
    BACKENDS,
    mark_fastest,
)
from resnet_export.bench.rows import Row
from resnet_export.bench.report import markdown_report, write_reports

from ..conftest import loaded
from ..test_cli import assert_one_line_error, run


def test_option_parsing():
    assert parse_list("torch, ort", BACKENDS, "backend") == ("torch", "ort")
    with pytest.raises(BenchError, match="unknown backend tensorflow; valid: torch, torch-compile, ort, ort-openvino, ort-cuda, ort-trt, trt, openvino"):
        parse_list("torch,tensorflow", BACKENDS, "backend")
    assert parse_batch_sizes("1,8,32") == (1, 8, 32)
    for bad in ("0", "1,a", "", "-4"):
        with pytest.raises(BenchError, match="positive integers"):
            parse_batch_sizes(bad)


def test_latency_stats():
    stats, throughput = latency_stats([0.010, 0.020, 0.030, 0.040], batch=8)
    assert stats["p50"] == pytest.approx(25.0) and stats["mean"] == pytest.approx(25.0)
    assert stats["p99"] == pytest.approx(39.7) and throughput == pytest.approx(320.0)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    model = loaded(arch="resnet18", num_classes=10, input_size=(32, 32))
    folder = tmp_path_factory.mktemp("bench")
    settings = Settings(batch_sizes=(1, 4), warmup=1, iters=3, threads=2)
    rows, env = run_matrix(model, ("torch", "ort", "ort-openvino", "openvino", "trt"), ("fp32", "int8"), settings,
                           folder / "artifacts")
    return model, folder, rows, env


def intel_cpu() -> bool:
    """Whether /proc/cpuinfo names an Intel CPU (read here, apart from the toolkit)."""
    from pathlib import Path

    return "GenuineIntel" in Path("/proc/cpuinfo").read_text()


def _row(rows, backend, precision, batch):
    return next(r for r in rows if (r.backend, r.precision, r.batch) == (backend, precision, batch))


@pytest.mark.slow
def test_matrix_measures_and_checks_every_row(matrix):
    import torch

    _, _, rows, env = matrix
    for backend in ("torch", "ort", "openvino"):
        row = _row(rows, backend, "fp32", 4)
        assert row.status == "ok" and row.throughput > 0 and row.latency_ms["p50"] > 0 and row.cores_busy > 0
        assert row.max_abs_err < 1e-3  # logits, not near-tied random top-1 decisions
    assert _row(rows, "ort", "int8", 4).status == "ok"
    for precision in ("fp32", "int8"):  # OpenVINO's kernels through ONNX Runtime's API, on the same files as ort
        row = _row(rows, "ort-openvino", precision, 4)
        if intel_cpu():
            assert row.status == "ok" and row.throughput > 0, row.reason
        else:  # the plugin offers Intel devices only
            assert row.status == "skipped" and "runs on Intel CPUs only" in row.reason
    assert torch.__version__.startswith(env["versions"]["torch"])  # 2.14.1 of 2.14.1+cu130


class _Sleeps:
    """A runner whose every call takes at least ``seconds``, logged by ``name`` in ``log``; returns ``output``."""

    def __init__(self, name, seconds, output, log):
        self.name, self.seconds, self.output, self.log = name, seconds, output, log

    def infer(self, batch):
        import time

        self.log.append(self.name)
        time.sleep(self.seconds)
        return self.output


def test_rows_are_timed_in_interleaved_rounds_and_speed_up_is_measured():
    """Rows are checked once, then timed round after round, each round visiting every row (warm-up first, one
    warm-up call per later round); iterations are the timed calls, latency at least what they took, and the
    speed-up the ratio of the measured throughputs. Sleeps, not compute, and only what load cannot change is
    asserted: the order and count of calls, lower bounds (load only lengthens a sleep), ratios of measured
    figures, and a sleeping process's own CPU time."""
    from resnet_export.bench.rows import Row
    from resnet_export.bench.harness import add_speedups, check, time_rows

    x, logits = np.zeros((2, 3, 8, 8), np.float32), np.eye(2, 10, dtype=np.float32)
    log = []
    slots = [check(Row("torch", "fp32", 2, timing="wall clock"), _Sleeps("t", 0.02, logits, log), None, x, logits),
             check(Row("ort", "fp32", 2, timing="wall clock"), _Sleeps("o", 0.01, logits, log), None, x, logits)]
    assert log == ["t", "o"]  # the check: one call each
    time_rows(slots, Settings(warmup=2, iters=10, rounds=5))
    rows = [slot.row for slot in slots]
    add_speedups(rows)
    # round 1: 2 warm-up and 2 timed calls per row; rounds 2-5: 1 warm-up and 2 timed
    assert "".join(log[2:]) == "".join(["tttt", "oooo"] + ["ttt", "ooo"] * 4)
    assert [(r.status, r.iterations) for r in rows] == [("ok", 10), ("ok", 10)]
    assert rows[0].latency_ms["p50"] >= 20 and rows[1].latency_ms["p50"] >= 10
    assert rows[1].speedup_vs_torch == pytest.approx(rows[1].throughput / rows[0].throughput)
    assert rows[1].throughput == pytest.approx(2 / (rows[1].latency_ms["mean"] / 1e3))
    assert rows[0].cores_busy < 0.5  # sleeping keeps no core of this process busy, whatever else runs
    timed = check(Row("ort", "fp32", 2, timing="wall clock"), _Sleeps("o", 0.01, logits, []), None, x, logits)
    time_rows([timed], Settings(warmup=0, min_time=0.2, rounds=4))
    assert timed.row.iterations * timed.row.latency_ms["mean"] / 1e3 >= 0.2 * 0.95  # --min-time: calls fill it


@pytest.mark.slow
def test_int8_row_reports_the_agreement_its_artifact_really_has(matrix):
    """Rerun the row's INT8 file on the row's batch (same seed): the agreement must be what the row says."""
    from resnet_export.runtime.runners import OrtRunner, TorchRunner
    from resnet_export.checks.verify import compare

    model, folder, rows, _ = matrix
    rng = np.random.default_rng(0)
    batches = {b: rng.standard_normal((b, 3, 32, 32), dtype=np.float32) for b in (1, 4)}
    calibration = rng.standard_normal((64, 3, 32, 32), dtype=np.float32)  # run_matrix's default, drawn next
    int8_file = Artifacts(model, folder / "artifacts", calibration).onnx("int8", "cpu")  # reused, not rebuilt
    metrics = compare(TorchRunner(model.module).infer(batches[4]), OrtRunner(int8_file).infer(batches[4]))
    row = _row(rows, "ort", "int8", 4)
    assert row.top1_agreement == metrics["top1_agreement"] and row.max_abs_err == pytest.approx(metrics["max_abs_err"])


@pytest.mark.slow
def test_gaps_are_stated(matrix):
    import importlib.util

    _, _, rows, _ = matrix
    torch_int8 = _row(rows, "torch", "int8", 1)
    assert torch_int8.status == "skipped" and "no INT8" in torch_int8.reason
    trt = _row(rows, "trt", "fp32", 1)
    if importlib.util.find_spec("tensorrt") is None:  # what this test sees, not what bench says
        assert trt.status == "skipped" and "TensorRT" in trt.reason and "not installed" in trt.reason
    else:
        assert trt.status in ("ok", "skipped") and (trt.status == "ok") == (trt.throughput is not None)


@pytest.mark.slow
def test_artifacts_are_reused_and_keyed_by_calibration(matrix):
    model, folder, _, _ = matrix
    calibration = np.random.default_rng(5).standard_normal((16, 3, 32, 32), dtype=np.float32)
    artifacts = Artifacts(model, folder / "artifacts", calibration)
    fp32, int8 = artifacts.onnx("fp32", "trt"), artifacts.onnx("int8", "cpu")
    built = {p: p.stat().st_mtime_ns for p in (fp32, int8)}
    again = Artifacts(model, folder / "artifacts", calibration)
    assert (again.onnx("fp32", "trt"), again.onnx("int8", "cpu")) == (fp32, int8)
    assert {p: p.stat().st_mtime_ns for p in built} == built  # nothing rebuilt
    other = Artifacts(model, folder / "artifacts", calibration + 1)
    assert other.calib_key != artifacts.calib_key  # other data: another INT8 file
    assert len(list(fp32.parent.glob("int8-cpu-*.onnx"))) == 2  # the matrix's and this one


class _Crashes:
    """A runner that answers ``good`` calls, then loses its device."""

    name = "crashes"

    def __init__(self, good=0):
        self.good = good

    def infer(self, batch):
        self.good -= 1
        if self.good < 0:
            raise RuntimeError("device lost")
        return np.zeros((len(batch), 10), np.float32)


def test_a_crash_is_an_error_row_and_the_other_rows_go_on():
    from resnet_export.bench.rows import Row
    from resnet_export.bench.harness import check, time_rows

    x, logits = np.zeros((1, 3, 8, 8), np.float32), np.zeros((1, 10), np.float32)
    at_check = check(Row("ort", "fp32", 1, timing="wall clock"), _Crashes(), None, x, logits)
    assert at_check.row.status == "error" and at_check.row.reason == "device lost" and at_check.call is None
    later = check(Row("ort", "fp32", 1, timing="wall clock"), _Crashes(good=3), None, x, logits)  # dies in round 2
    fine = check(Row("openvino", "fp32", 1, timing="wall clock"), _Crashes(good=100), None, x, logits)
    time_rows([at_check, later, fine], Settings(warmup=1, iters=4, rounds=4))
    assert later.row.status == "error" and later.row.reason == "device lost" and later.row.throughput is None
    assert fine.row.status == "ok" and fine.row.iterations == 4


@pytest.mark.slow
def test_reports(matrix, tmp_path):
    model, _, rows, env = matrix
    paths = write_reports(rows, env, model.name, tmp_path)
    data = json.loads(paths["report.json"].read_text())
    assert data["schema_version"] == 4 and len(data["rows"]) == len(rows)
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    for key in {(r["precision"], r["batch"], r["clock"]) for r in ok}:  # one fastest per clock, the highest img/s
        group = [r for r in ok if (r["precision"], r["batch"], r["clock"]) == key]
        assert [r for r in group if r["fastest"]] == [max(group, key=lambda r: r["throughput"])]
    md = paths["report.md"].read_text()
    assert "| backend | precision | batch |" in md and "| torch | int8 | 1 | skipped: PyTorch has no INT8" in md
    for name in ("throughput.png", "latency.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ort_openvino_runs_the_model_on_openvinos_kernels_through_onnx_runtime(resnet18_onnx):
    pytest.importorskip("onnxruntime_ep_openvino", reason="the OpenVINO plugin EP ships for Linux x86_64 only")
    from resnet_export.errors import OnnxError
    from resnet_export.runtime.runners import OPENVINO_EP, OrtRunner, openvino_ep_unavailable

    reason = openvino_ep_unavailable()
    assert (reason is None) == intel_cpu(), reason  # the plugin offers Intel devices only (ov_factory.cc)
    if reason:  # an AMD CPU: a one-line error naming it, never ONNX Runtime's "Must provide one or more OrtEpDevice"
        with pytest.raises(OnnxError, match="offers no device for this CPU .*: it runs on Intel CPUs only"):
            OrtRunner(resnet18_onnx.path, [OPENVINO_EP])
        return
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    cpu, openvino = OrtRunner(resnet18_onnx.path), OrtRunner(resnet18_onnx.path, [OPENVINO_EP], threads=1)
    assert openvino.session.get_providers()[0] == OPENVINO_EP  # not a silent fall-back to the CPU provider
    np.testing.assert_allclose(openvino.infer(x), cpu.infer(x), atol=1e-3)  # FP32 kept (precision ACCURACY)
    assert OrtRunner(resnet18_onnx.path, [OPENVINO_EP]).session.get_providers()[0] == OPENVINO_EP  # registered once


def test_fastest_backend_is_marked_per_precision_batch_and_clock():
    """Only rows measured by the same clock compare: a CUDA-event row (device time, no copies) is the fastest of its
    own clock, never beside wall-clock rows."""
    def row(backend, precision, batch, img_s, timing="wall clock, CPU", status="ok", clock="wall clock"):
        return Row(backend, precision, batch, status=status, timing=timing, throughput=img_s, iterations=3,
                   latency_ms={k: 1.0 for k in ("p50", "p90", "p99", "mean")}, top1_agreement=1.0, max_abs_err=0.0,
                   cores_busy=1.0, clock=clock)

    events = dict(timing="CUDA events on the engine's stream, inputs on device", clock="CUDA events")
    rows = [row("torch", "fp32", 1, 10.0), row("ort", "fp32", 1, 30.0), row("openvino", "fp32", 1, 20.0),
            row("ort", "int8", 1, 50.0), row("openvino", "int8", 1, 60.0),
            row("trt", "int8", 1, 900.0, **events), row("trt", "int8", 1, 450.0, **events),
            row("ort", "int8", 8, 70.0), row("openvino", "int8", 8, None, status="error")]
    rows[6].timing += ", CUDA graph"
    mark_fastest(rows)
    assert [(r.backend, r.precision, r.batch, r.clock) for r in rows if r.fastest] == [
        ("ort", "fp32", 1, "wall clock"), ("openvino", "int8", 1, "wall clock"), ("trt", "int8", 1, "CUDA events"),
        ("ort", "int8", 8, "wall clock")]
    md = markdown_report(rows, {"cpu": "x", "cores": 2, "cpu_flags": [], "threads_requested": 2, "gpu": None,
                                "versions": {}}, "m")
    assert "| **60.0** (fastest) |" in md and "| 50.0 |" in md
    assert "- int8 batch 1, wall clock: **openvino** (60.0 img/s; 1.20x ort)" in md
    assert "- int8 batch 1, CUDA events: **trt (CUDA events on the engine's stream, inputs on device)** (900.0 img/s; " \
           "2.00x trt (CUDA graph))" in md
    assert "- fp32 batch 1, wall clock: **ort** (30.0 img/s; 1.50x openvino)" in md
    assert "- int8 batch 8, wall clock: **ort** (70.0 img/s; the only row)" in md


def test_the_report_says_what_was_measured_and_leaves_out_columns_no_row_fills():
    """Weights and INT8 form in the header; no "compile s" where nothing compiled, no "vs best torch" where it repeats
    "vs torch fp32" (one PyTorch row), a gate column where rows were gated."""
    def row(backend, img_s, speedup, best=None, compile_s=None):
        return Row(backend, "fp32", 1, timing="wall clock, CPU", throughput=img_s, iterations=3, cores_busy=1.0,
                   latency_ms={k: 1.0 for k in ("p50", "p90", "p99", "mean")}, top1_agreement=1.0, max_abs_err=0.0,
                   speedup_vs_torch=speedup, speedup_vs_best_torch=best, compile_seconds=compile_s, gate="passed")

    env = {"cpu": "x", "cores": 2, "cpu_flags": ["avx2"], "threads_requested": 2, "gpu": None,
           "versions": {"torch": "2.14"}, "int8": "cpu target: 7-bit weights; calibrated on 64 seeded random inputs"}
    md = markdown_report([row("torch", 10.0, 1.0), row("ort", 20.0, 2.0, best=2.0)], env, "m", "random")
    header = next(line for line in md.splitlines() if line.startswith("| backend"))
    assert "compile s" not in header and "vs best torch" not in header and "| gate |" in header
    assert "Weights: random (top-1 agreement compares near-tie logits" in md
    assert "INT8: cpu target: 7-bit weights; calibrated on 64 seeded random inputs" in md
    md = markdown_report([row("torch", 10.0, 1.0), row("torch-compile", 40.0, 4.0, compile_s=9.5),
                          row("ort", 20.0, 2.0, best=0.5)], env, "m", "trained")
    header = next(line for line in md.splitlines() if line.startswith("| backend"))
    assert "compile s" in header and "vs best torch" in header and "| 9.5 |" in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backends", "torch,tensorflow"], "unknown backend tensorflow"),
        (["--precisions", "fp64"], "unknown precision fp64"),
        (["--batch-sizes", "0,8"], "positive integers"),
    ],
)
def test_bench_option_errors(tmp_path, args, message):
    assert_one_line_error(run("bench", *args, "--report", tmp_path / "r"), message)


def test_bench_unwritable_report(tmp_path):
    assert_one_line_error(run("bench", "--report", "/proc/resnet-export-report"), "is not writable")


@pytest.mark.slow
def test_bench_command_prints_its_report(tmp_path):
    report = tmp_path / "nested" / "report"
    result = run("bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends", "torch,ort",
                 "--precisions", "fp32", "--batch-sizes", "1", "--warmup", "0", "--iters", "2", "--report", report)
    assert result.exit_code == 0, result.output
    assert "| torch | fp32 | 1 | wall clock, CPU |" in result.stdout and "| ort | fp32 | 1 |" in result.stdout
    assert (report / "report.json").is_file() and (report / "latency.png").is_file()


def test_artifacts_are_keyed_by_everything_that_defines_the_model(tmp_path):
    from resnet_export.bench.artifacts import artifact_key
    from resnet_export.source.models import load_model

    from ..conftest import USER_MODELS

    small = {"arch": "resnet18", "num_classes": 10, "input_size": (32, 32)}
    seed0, seed1 = load_model(**small, seed=0), load_model(**small, seed=1)
    assert artifact_key(seed0, 0) != artifact_key(seed1, 1)
    assert artifact_key(seed0, 0) == artifact_key(load_model(**small, seed=0), 0)
    assert artifact_key(seed0, 0) != artifact_key(seed0, 0, opset=19)
    factory = tmp_path / "models.py"
    factory.write_text(USER_MODELS.read_text())
    user = load_model(model=f"{factory}:cifar_resnet", input_size=(32, 32))
    before = artifact_key(user, 0)
    factory.write_text(USER_MODELS.read_text() + "\n# edited\n")
    assert artifact_key(user, 0) != before  # same path, other content


def test_bench_plans_are_keyed_on_tensorrt_and_gpu_and_reused_only_where_they_run(tmp_path):
    """After a TensorRT upgrade or on another GPU, bench builds a new plan and timing cache instead of
    failing on the old ones; a plan is reused only when its manifest passed and says it runs here."""
    from dataclasses import asdict, replace

    from resnet_export.manifest import write_manifest
    from resnet_export.source.models import load_model
    from resnet_export.engine.build import BatchProfile

    from ..engine.test_trt import HERE

    artifacts = Artifacts(load_model(arch="resnet18", num_classes=10, input_size=(32, 32)), tmp_path,
                          np.zeros((2, 3, 32, 32), np.float32))
    profile = BatchProfile(1, 8, 8)
    plan, cache = artifacts.engine_files("int8", profile, HERE)
    key = "trt10.13.3-sm89-nvidia-l4-linux-x86_64"
    assert plan.name == f"int8-{artifacts.calib_key}-b1-8-8-{key}.plan" and cache.name == f"timing-{key}.cache"
    assert artifacts.engine_files("int8", BatchProfile(1, 4, 4), HERE)[0] != plan  # one plan per benchmarked batch
    for other in ({"tensorrt": "11.4.0"}, {"compute_capability": "9.0"}, {"gpu": "NVIDIA GeForce RTX 4090"}):
        assert set(artifacts.engine_files("int8", profile, replace(HERE, **other))).isdisjoint({plan, cache})
    assert not artifacts.reusable(plan, HERE)  # not built yet
    plan.write_bytes(b"stand-in: reuse is decided from the manifest")
    write_manifest(plan, stage="engine", **asdict(HERE), options={}, verification={"passed": True})
    assert artifacts.reusable(plan, HERE)
    assert not artifacts.reusable(plan, replace(HERE, tensorrt="10.13.4"))  # a copied-in plan of another TensorRT
    write_manifest(plan, stage="engine", **asdict(HERE), options={}, verification={"passed": False})
    assert not artifacts.reusable(plan, HERE)  # failed its gate: built again


@pytest.mark.slow
def test_bench_calibrates_on_npy(tmp_path):
    arrays = tmp_path / "calib.npy"
    np.save(arrays, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    result = run("bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends", "ort",
                 "--precisions", "int8", "--batch-sizes", "2", "--warmup", "0", "--iters", "2", "--calib", arrays,
                 "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "report" / "report.json").read_text())["rows"][0]
    assert row["status"] == "ok"
    saved = np.load(next((tmp_path / "report" / "artifacts").glob("*/calibration-*.npy")))
    assert np.array_equal(saved, np.load(arrays))  # what INT8 was calibrated on: the file's arrays, not random ones


@pytest.mark.slow
def test_bench_artifacts_pass_their_gates_and_a_failed_one_is_rebuilt(tmp_path):
    """bench --precisions fp16,int8 makes its ONNX files through the commands' pipeline: gated, with manifests.
    An FP32 ONNX whose manifest says it failed its gate is built again, never timed as it is."""
    from ..test_cli import run

    report = tmp_path / "report"
    args = ["bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends", "ort",
            "--precisions", "fp16,int8", "--batch-sizes", "2", "--warmup", "0", "--iters", "3", "--report", report]
    result = run(*args)
    assert result.exit_code == 0, result.output
    rows = json.loads((report / "report.json").read_text())["rows"]
    assert {(r["precision"], r["status"]) for r in rows} == {("fp16", "ok"), ("int8", "ok")}
    folder = next((report / "artifacts").iterdir())
    for name in ("fp32.onnx", "fp16.onnx", next(p.name for p in folder.glob("int8-cpu-*.onnx"))):
        manifest = json.loads((folder / f"{name}.json").read_text())
        assert manifest["verification"]["passed"] and manifest["verification"]["gate"]
    fp32 = folder / "fp32.onnx.json"
    failed = json.loads(fp32.read_text())
    failed["verification"]["passed"] = False
    fp32.write_text(json.dumps(failed))
    before = (folder / "fp32.onnx").stat().st_mtime_ns
    assert run(*args).exit_code == 0
    assert (folder / "fp32.onnx").stat().st_mtime_ns != before  # rebuilt, and verified again
    assert json.loads(fp32.read_text())["verification"]["passed"]


def test_comparison_logic_on_reports():
    from resnet_export.bench.baseline import compare_reports, cpu_class

    env = {"cpu": "Intel(R) Xeon(R) Platinum 8380", "arch": "x86_64", "cores": 2, "cpu_flags": ["avx2", "avx512_vnni"],
           "threads_requested": 2}
    rows = [{"backend": "torch", "precision": "fp32", "batch": 8, "timing": "wall", "status": "ok", "throughput": 10.0,
             "speedup_vs_torch": 1.0, "top1_agreement": 1.0, "max_abs_err": 1e-5},
            {"backend": "ort", "precision": "int8", "batch": 8, "timing": "wall", "status": "ok", "throughput": 50.0,
             "speedup_vs_torch": 5.0, "top1_agreement": 1.0, "max_abs_err": 0.05}]
    report = {"model": "resnet18", "weights": "trained", "environment": env, "rows": rows}
    assert cpu_class(env) == "x86_64-avx512_vnni-2c"
    same = compare_reports(report, report, "itself")
    assert not same.regressions and not same.improvements and same.measures[:3] == [
        "speed-up vs torch", "img/s", "top-1 agreement"]
    slower = {**report, "rows": [rows[0], {**rows[1], "speedup_vs_torch": 2.5, "throughput": 25.0, "top1_agreement": 0.75}]}
    found = compare_reports(slower, report, "base")
    assert {(c.row, c.measure) for c in found.regressions} == {
        ("ort int8 b8 (wall)", "speed-up vs torch"), ("ort int8 b8 (wall)", "img/s"), ("ort int8 b8 (wall)", "top-1 agreement")}
    assert found.regressions[0].change == "-50%" and "| ort int8 b8 (wall) |" in found.markdown()
    assert {(c.row, c.measure) for c in compare_reports(report, slower, "base").improvements} == {
        ("ort int8 b8 (wall)", "speed-up vs torch"), ("ort int8 b8 (wall)", "img/s"), ("ort int8 b8 (wall)", "top-1 agreement")}
    other = {**report, "environment": {**env, "cpu_flags": ["avx2"], "cores": 64}}
    fidelity_only = compare_reports(slower, other, "elsewhere")
    assert not fidelity_only.same_class and fidelity_only.measures == ["top-1 agreement", "max abs err"]
    assert [c.measure for c in fidelity_only.regressions] == ["top-1 agreement"]
    # A hypervisor's generic CPU name hides hosts of any speed: no img/s, the speed-up within the run still counts
    generic = {**env, "cpu": "Intel(R) Xeon(R) Processor"}
    masked = compare_reports({**slower, "environment": generic}, {**report, "environment": generic}, "same VM type")
    assert masked.same_class and "img/s" not in masked.measures
    assert {c.measure for c in masked.regressions} == {"speed-up vs torch", "top-1 agreement"}


def test_agreement_is_gated_only_where_it_means_something():
    """One flipped input of an 8-input row is 12.5 points and no trend; random weights' logits are near-ties."""
    from resnet_export.bench.baseline import compare_reports

    env = {"cpu": "Xeon", "arch": "x86_64", "cores": 2, "cpu_flags": ["avx2"], "threads_requested": 2}
    row = {"backend": "ort", "precision": "int8", "batch": 8, "timing": "wall", "status": "ok", "throughput": 50.0,
           "speedup_vs_torch": 5.0, "top1_agreement": 1.0, "max_abs_err": 0.05}
    trained = {"model": "resnet18", "weights": "trained", "environment": env, "rows": [row]}

    def agreement(report, value):
        return {**report, "rows": [{**row, "top1_agreement": value}]}

    assert not compare_reports(agreement(trained, 0.875), trained, "base").regressions  # one input flipped
    assert compare_reports(agreement(trained, 0.75), trained, "base").regressions  # two did
    for weights in ("random", None):  # random weights, or a report that does not say
        report = {**trained, "weights": weights}
        found = compare_reports(agreement(report, 0.0), report, "base")
        assert "top-1 agreement" not in found.measures and not found.regressions
        assert compare_reports({**report, "rows": [{**row, "max_abs_err": 0.5}]}, report, "base").regressions


@pytest.mark.slow
def test_bench_baseline_gates_regressions_by_row(tmp_path):
    from ..test_cli import run

    args = ["bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends", "torch,ort",
            "--precisions", "fp32", "--batch-sizes", "2", "--warmup", "1", "--iters", "5"]
    assert run(*args, "--report", tmp_path / "base").exit_code == 0
    base = tmp_path / "base" / "report.json"

    def report(name):  # a new report folder holding the first run's artifacts, so later runs reuse them
        shutil.copytree(tmp_path / "base" / "artifacts", tmp_path / name / "artifacts")
        return tmp_path / name

    again = run(*args, "--report", report("again"), "--baseline", base, "--max-regression", "80")
    assert again.exit_code == 0, again.output  # the same machine against its own fresh baseline (noise < 80%)
    assert "## Compared with" in again.stdout and json.loads((tmp_path / "again" / "report.json").read_text())["compared_with"]
    faster = json.loads(base.read_text())
    for row in faster["rows"]:
        if row["backend"] == "ort":
            row["speedup_vs_torch"] *= 100  # far beyond any noise of this run (the torch row alone moved 44% once)
    doctored = tmp_path / "faster.json"
    doctored.write_text(json.dumps(faster))
    slow = run(*args, "--report", report("slow"), "--baseline", doctored)
    assert slow.exit_code == 3 and "regression(s) against" in slow.stderr and "ort fp32 b2" in slow.stderr
    elsewhere = {**faster, "environment": {**faster["environment"], "cpu_flags": ["avx2"], "cores": 64}}
    (tmp_path / "other.json").write_text(json.dumps(elsewhere))
    other = run(*args, "--report", report("other"), "--baseline", tmp_path / "other.json")
    assert other.exit_code == 0, other.output
    assert "comparing fidelity only" in other.stderr and "fidelity only" in other.stdout
    folder = tmp_path / "baselines"  # --baseline DIR, as make bench-ci passes: the file of this CPU class
    folder.mkdir()
    (folder / "a-elsewhere.json").write_text(json.dumps(elsewhere))
    (folder / "b-here.json").write_text(json.dumps(faster))
    picked = run(*args, "--report", report("picked"), "--baseline", folder)
    assert picked.exit_code == 3 and f"## Compared with {folder / 'b-here.json'}" in picked.stdout
    (folder / "b-here.json").unlink()
    none = run(*args, "--report", report("none"), "--baseline", folder)
    assert none.exit_code == 0 and "nothing compared" in none.stderr and "## Compared with" not in none.stdout
    trend = run("trend", tmp_path, "-o", tmp_path / "trend")  # base, again, slow, other (+ the doctored copies' dirs)
    assert trend.exit_code == 0, trend.output
    assert "6 reports under" in trend.stdout and "| ort fp32 b2 (wall clock, CPU) | speed-up vs torch |" in trend.stdout
    assert (tmp_path / "trend" / "trend.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_calibrates_on_a_folder_for_min_time_with_the_seed_asked(tmp_path):
    """--calib DIR --calib-size N --seed S --min-time T, as observed: the INT8 file was calibrated on N images
    (the arrays bench saved beside it), the artifacts are keyed by the seed's model, the timed calls fill T."""
    from resnet_export.bench.artifacts import artifact_key
    from resnet_export.source.models import load_model

    from ..conftest import IMAGES

    result = run("bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends", "ort",
                 "--precisions", "int8", "--batch-sizes", "2", "--warmup", "0", "--min-time", "0.5", "--calib", IMAGES,
                 "--calib-size", "5", "--seed", "3", "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "report" / "report.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["iterations"] * row["latency_ms"]["mean"] / 1e3 >= 0.5 * 0.95
    seeded = load_model(arch="resnet18", num_classes=10, input_size=(32, 32), seed=3)
    folder = tmp_path / "report" / "artifacts" / f"resnet18-{artifact_key(seeded, 3)}"
    saved = np.load(next(folder.glob("calibration-*.npy")))  # the images INT8 was calibrated on
    assert saved.shape == (5, 3, 32, 32) and json.loads(next(folder.glob("int8-cpu-*.onnx.json")).read_text())[
        "settings"]["calib"].endswith(".npy")


@pytest.mark.slow
def test_gpu_onnx_runtime_backends_without_a_gpu_are_skipped_rows(tmp_path):
    """ort-cuda and ort-trt where this machine lacks them: stated rows, and the CPU rows still run."""
    import onnxruntime as ort
    import torch

    from resnet_export.bench.harness import backend_unavailable

    if torch.cuda.is_available() and {"CUDAExecutionProvider", "TensorrtExecutionProvider"} <= set(
            ort.get_available_providers()):
        pytest.skip("this machine runs both GPU backends")
    result = run("bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends",
                 "ort-cuda,ort-trt,ort", "--precisions", "fp32", "--batch-sizes", "1", "--warmup", "0", "--iters", "2",
                 "--report", tmp_path / "report")
    assert result.exit_code == 0, result.output
    rows = {r["backend"]: r for r in json.loads((tmp_path / "report" / "report.json").read_text())["rows"]}
    assert rows["ort"]["status"] == "ok"
    for backend in ("ort-cuda", "ort-trt"):
        reason = backend_unavailable(backend)  # what this machine lacks, asked of ONNX Runtime and torch directly
        if not torch.cuda.is_available():
            assert reason == "no CUDA GPU on this machine"
        if reason is None:  # this backend runs here: a checked row
            assert rows[backend]["status"] == "ok" and rows[backend]["top1_agreement"] is not None
        else:
            assert rows[backend]["status"] == "skipped" and rows[backend]["reason"] == reason
            assert f"| {backend} | fp32 | 1 | skipped: {reason}" in result.stdout
