"""The benchmark harness on a tiny model: rows, stated gaps, error rows, reports."""

import json

import numpy as np
import pytest

from resnet_export.bench import (
    backend_unavailable,
    Artifacts,
    BenchError,
    Settings,
    latency_stats,
    measure,
    parse_batch_sizes,
    parse_list,
    run_matrix,
    write_reports,
    BACKENDS,
)

from .conftest import loaded
from .test_cli import assert_one_line_error, run


def test_option_parsing():
    assert parse_list("torch, ort", BACKENDS, "backend") == ("torch", "ort")
    with pytest.raises(BenchError, match="unknown backend tensorflow; valid: torch, ort, ort-cuda, ort-trt, trt, openvino"):
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
    rows, env = run_matrix(model, ("torch", "ort", "openvino", "trt"), ("fp32", "int8"), settings, folder / "artifacts")
    return model, folder, rows, env


def _row(rows, backend, precision, batch):
    return next(r for r in rows if (r.backend, r.precision, r.batch) == (backend, precision, batch))


@pytest.mark.slow
def test_matrix_measures_and_checks_every_row(matrix):
    _, _, rows, env = matrix
    for backend in ("torch", "ort", "openvino"):
        row = _row(rows, backend, "fp32", 4)
        assert row.status == "ok" and row.iterations == 3 and row.throughput > 0 and row.latency_ms["p50"] > 0
        assert row.max_abs_err < 1e-3 and row.threads == 2  # logits, not near-tied random top-1 decisions
    int8 = _row(rows, "ort", "int8", 4)
    assert int8.status == "ok"
    ort, torch_row = _row(rows, "ort", "fp32", 4), _row(rows, "torch", "fp32", 4)
    assert ort.speedup_vs_torch == pytest.approx(ort.throughput / torch_row.throughput)
    assert env["threads_requested"] == 2 and env["versions"]["torch"]


@pytest.mark.slow
def test_int8_row_reports_the_agreement_its_artifact_really_has(matrix):
    """Rerun the row's INT8 file on the row's batch (same seed): the agreement must be what the row says."""
    from resnet_export.runners import OrtRunner, TorchRunner
    from resnet_export.verify import compare

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
    _, _, rows, _ = matrix
    torch_int8 = _row(rows, "torch", "int8", 1)
    assert torch_int8.status == "skipped" and "no INT8" in torch_int8.reason
    trt = _row(rows, "trt", "fp32", 1)
    reason = backend_unavailable("trt")
    if reason:
        assert trt.status == "skipped" and trt.reason == reason
    else:
        assert trt.status == "ok" and trt.throughput > 0


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
    name = "crashes"

    def infer(self, batch):
        raise RuntimeError("device lost")


def test_a_crash_is_an_error_row():
    x = np.zeros((1, 3, 8, 8), np.float32)
    row = measure("ort", "fp32", 1, "wall clock", _Crashes(), None, x, np.zeros((1, 10)), Settings(iters=1))
    assert row.status == "error" and row.reason == "device lost"


@pytest.mark.slow
def test_reports(matrix, tmp_path):
    model, _, rows, env = matrix
    paths = write_reports(rows, env, model.name, tmp_path)
    data = json.loads(paths["report.json"].read_text())
    assert data["schema_version"] == 1 and len(data["rows"]) == len(rows)
    md = paths["report.md"].read_text()
    assert "| backend | precision | batch |" in md and "| torch | int8 | 1 | skipped: PyTorch eager has no INT8" in md
    for name in ("throughput.png", "latency.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    from resnet_export.bench import artifact_key
    from resnet_export.models import load_model

    from .conftest import USER_MODELS

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
    from resnet_export.models import load_model
    from resnet_export.trt import BatchProfile

    from .test_trt import HERE

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
    assert row["status"] == "ok" and row["iterations"] == 2


@pytest.mark.slow
def test_bench_artifacts_pass_their_gates_and_a_failed_one_is_rebuilt(tmp_path):
    """bench --precisions fp16,int8 makes its ONNX files through the commands' pipeline: gated, with manifests.
    An FP32 ONNX whose manifest says it failed its gate is built again, never timed as it is."""
    from .test_cli import run

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
    from resnet_export.baseline import compare_reports, cpu_class

    env = {"cpu": "Xeon", "arch": "x86_64", "cores": 2, "cpu_flags": ["avx2", "avx512_vnni"], "threads_requested": 2}
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


def test_agreement_is_gated_only_where_it_means_something():
    """One flipped input of an 8-input row is 12.5 points and no trend; random weights' logits are near-ties."""
    from resnet_export.baseline import compare_reports

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
    from .test_cli import run

    args = ["bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends", "torch,ort",
            "--precisions", "fp32", "--batch-sizes", "2", "--warmup", "1", "--iters", "5"]
    assert run(*args, "--report", tmp_path / "base").exit_code == 0
    base = tmp_path / "base" / "report.json"
    again = run(*args, "--report", tmp_path / "again", "--baseline", base, "--max-regression", "80")
    assert again.exit_code == 0, again.output  # the same machine against its own fresh baseline (noise < 80%)
    assert "## Compared with" in again.stdout and json.loads((tmp_path / "again" / "report.json").read_text())["compared_with"]
    faster = json.loads(base.read_text())
    for row in faster["rows"]:
        if row["backend"] == "ort":
            row["speedup_vs_torch"] *= 100  # far beyond any noise of this run (the torch row alone moved 44% once)
    doctored = tmp_path / "faster.json"
    doctored.write_text(json.dumps(faster))
    slow = run(*args, "--report", tmp_path / "slow", "--baseline", doctored)
    assert slow.exit_code == 3 and "regression(s) against" in slow.stderr and "ort fp32 b2" in slow.stderr
    elsewhere = {**faster, "environment": {**faster["environment"], "cpu_flags": ["avx2"], "cores": 64}}
    (tmp_path / "other.json").write_text(json.dumps(elsewhere))
    other = run(*args, "--report", tmp_path / "other", "--baseline", tmp_path / "other.json")
    assert other.exit_code == 0, other.output
    assert "comparing fidelity only" in other.stderr and "fidelity only" in other.stdout
    trend = run("trend", tmp_path, "-o", tmp_path / "trend")  # base, again, slow, other (+ the doctored copies' dirs)
    assert trend.exit_code == 0, trend.output
    assert "4 reports under" in trend.stdout and "| ort fp32 b2 (wall clock, CPU) | speed-up vs torch |" in trend.stdout
    assert (tmp_path / "trend" / "trend.png").read_bytes()[:4] == b"\x89PNG"
