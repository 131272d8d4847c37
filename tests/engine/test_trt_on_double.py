"""The toolkit's TensorRT glue end to end, on the TensorRT double (tests/trt_double), through the CLI.

Every test here runs on the double: builds, contexts, shapes, addresses, streams, captures, timing
caches and manifests are the toolkit's own code, computing with ONNX Runtime on the host. No figure
from here is a TensorRT figure, and every manifest and report made here says so (its TensorRT
version ends in ``+double``, its GPU is the double's host device).
"""

import json
import shutil
import threading

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from resnet_export.engine.runner import TrtRunner

from ..conftest import IMAGES, double_installed
from ..test_cli import assert_one_line_error, run
from ..trt_double import HOST_GPU, HostDevice
from ..trt_double import tensorrt as double

MODEL = ["--arch", "resnet18", "--num-classes", "5", "--input-size", "64"]


def manifest_of(plan) -> dict:
    return json.loads(plan.with_name(plan.name + ".json").read_text())


@pytest.fixture
def checkpoint(resnet18_small, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(resnet18_small.module.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def built_fp32_plan(resnet18_onnx, tmp_path_factory):
    """`trt --onnx` on the session's resnet18 ONNX, profile 1..8: a plan and its manifest, built once on the double."""
    plan = tmp_path_factory.mktemp("fp32-plan") / "r18.plan"
    with pytest.MonkeyPatch.context() as patch, double_installed(patch):
        result = run("trt", "--onnx", resnet18_onnx.path, "--min-batch", "1", "--opt-batch", "4", "--max-batch",
                     "8", "-o", plan)
    assert result.exit_code == 0, result.output
    return plan


@pytest.fixture
def fp32_plan(trt_double, built_fp32_plan, tmp_path):
    """This test's copy of the module's plan and everything written beside it (its manifest)."""
    for path in built_fp32_plan.parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / built_fp32_plan.name


def test_trt_writes_a_plan_and_a_manifest_that_says_it_was_the_double(fp32_plan, resnet18_onnx):
    manifest = manifest_of(fp32_plan)
    assert manifest["tensorrt"] == double.__version__ and manifest["tensorrt"].endswith("+double")
    assert manifest["gpu"] == HOST_GPU and manifest["platform"] and manifest["cuda_driver"] is None
    assert manifest["verification"]["passed"] and manifest["verification"]["batch_sizes"] == [1, 4, 8]
    assert manifest["options"]["tf32"] is False and "Built with: TF32 off" in run("inspect", fp32_plan).stdout
    assert manifest["profile"] == {"input": "input", "min": [1, 3, 64, 64], "opt": [4, 3, 64, 64],
                                   "max": [8, 3, 64, 64]}
    assert manifest["io"] == [{"name": "input", "mode": "input", "dtype": "FLOAT", "shape": [-1, 3, 64, 64]},
                              {"name": "logits", "mode": "output", "dtype": "FLOAT", "shape": [-1, 5]}]
    assert fp32_plan.read_bytes().startswith(double._MAGIC)


def test_every_build_option_reaches_the_builder_and_its_manifest(trt_double, resnet18_onnx, tmp_path, monkeypatch):
    """On the double: each option is seen by the (double) builder config, and recorded."""
    seen = []
    original = double.Builder.build_serialized_network

    def spy(self, network, config):
        seen.append(config)
        return original(self, network, config)

    monkeypatch.setattr(double.Builder, "build_serialized_network", spy)
    out, cache = tmp_path / "opts.plan", tmp_path / "timing.cache"
    result = run("trt", "--onnx", resnet18_onnx.path, "--workspace", "512", "--timing-cache", cache,
                 "--builder-opt-level", "1", "--version-compatible", "--hardware-compat", "--tf32",
                 "--min-batch", "1", "--opt-batch", "2", "--max-batch", "4", "-o", out)
    assert result.exit_code == 0, result.output
    config, = seen
    assert config._pools == {double.MemoryPoolType.WORKSPACE: 512 << 20} and config.builder_optimization_level == 1
    assert config.get_flag(double.BuilderFlag.VERSION_COMPATIBLE) and config.get_flag(double.BuilderFlag.TF32)
    assert config.hardware_compatibility_level == double.HardwareCompatibilityLevel.AMPERE_PLUS
    assert config.profiling_verbosity == double.ProfilingVerbosity.DETAILED
    assert config._profiles[0]._shapes == {"input": ((1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))}
    manifest = manifest_of(out)
    assert manifest["options"] == {"workspace_mib": 512, "timing_cache": str(cache), "builder_optimization_level": 1,
                                   "version_compatible": True, "hardware_compatible": True, "tf32": True}
    assert manifest["verification"]["gate"]["min_cosine"] == 0.999  # TF32: FP16's gate, not FP32's
    assert "Built with: TF32 on, version compatible, hardware compatible" in run("inspect", out).stdout
    assert json.loads(cache.read_bytes())["entries"]  # saved after the build, with what it tuned


@pytest.mark.slow
def test_fp16_plan_from_the_cli(trt_double, resnet18_onnx, tmp_path):
    plan = tmp_path / "r18.plan"
    result = run("trt", "--onnx", resnet18_onnx.path, "--fp16", "--opt-batch", "4", "--max-batch", "4", "-o", plan)
    assert result.exit_code == 0, result.output
    assert "FP16 engine (TF32 off), TensorRT 10.16.1.11+double" in result.stdout
    manifest = manifest_of(plan)
    assert manifest["precision"]["dtype"] == "fp16" and manifest["verification"]["passed"]
    assert manifest["onnx"] == str(tmp_path / "r18.fp16.onnx")


@pytest.mark.slow
def test_int8_plan_from_a_trained_model_verifies_inspects_and_predicts(trt_double, digits, tmp_path):
    """`trt --int8 --calib` on a trained model, then the commands a user runs on the plan, all on the double."""
    plan = tmp_path / "digits.plan"
    model = ["--model", digits.model.source["factory"], "--weights", digits.checkpoint, "--input-size", "32"]
    result = run("trt", *model, "--int8", "--calib", digits.train, "--calib-method", "max", "--calib-size", "64",
                 "--val", digits.val, "--rest", "fp32", "--min-cosine", "0.97", "--max-batch", "16", "-o", plan)
    assert result.exit_code == 0, result.output
    assert manifest_of(plan)["precision"]["dtype"] == "int8" and manifest_of(plan)["verification"]["passed"]
    int8 = onnx.load(str(tmp_path / "digits.int8.onnx"))  # --rest fp32: nothing in the graph is float16
    fp16 = onnx.TensorProto.FLOAT16
    assert not [i.name for i in int8.graph.initializer if i.data_type == fp16]
    assert not [n.name for n in int8.graph.node if n.op_type == "Cast" and n.attribute[0].i == fp16]
    gate = manifest_of(tmp_path / "digits.int8.onnx")["verification"]
    assert gate["gate"]["min_cosine"] == 0.97 and gate["metrics"]["min_cosine"] >= 0.97
    verified = run("verify", plan, *model, "--images", digits.val)
    assert verified.exit_code == 0, verified.output
    assert "INT8 (from its manifest)" in verified.stdout and verified.stdout.rstrip().endswith("PASS")
    inspected = run("inspect", plan, "--json")
    assert inspected.exit_code == 0, inspected.output
    engine = json.loads(inspected.stdout)["engine"]
    assert engine["convolutions"].get("INT8", 0) > 0  # read through the inspector, with the context's shape set
    assert not any("N/A" in p for layer in engine["layers"] for p in layer["inputs"] + layer["outputs"])
    out = tmp_path / "top.jsonl"
    predicted = run("predict", plan, digits.val, "--backend", "trt", "--batch", "16", "-o", out)
    assert predicted.exit_code == 0, predicted.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    images = [p for p in digits.val.rglob("*.png")]
    assert len(rows) == len(images) and "(trt)" in predicted.stdout


def test_verify_and_predict_a_plan(fp32_plan, checkpoint, tmp_path):
    result = run("verify", fp32_plan, *MODEL, "--weights", checkpoint, "--images", IMAGES)
    assert result.exit_code == 0, result.output
    assert "FP32 (from its manifest) vs PyTorch FP32 on 6 images" in result.stdout and "PASS" in result.stdout
    out = tmp_path / "top.csv"
    predicted = run("predict", fp32_plan, IMAGES, "-o", out, "--batch", "4")
    assert predicted.exit_code == 0, predicted.output
    assert len(out.read_text().splitlines()) == 1 + 6  # header, one row per image


def test_inspect_a_plan_shows_its_layers(fp32_plan):
    result = run("inspect", fp32_plan)
    assert result.exit_code == 0, result.output
    assert "Convolutions by input precision: FP32 20" in result.stdout


def test_triton_entry_from_a_built_plan(fp32_plan, tmp_path):
    result = run("triton", fp32_plan, "--repo", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "repo" / "r18" / "1" / "model.8.9.plan").read_bytes() == fp32_plan.read_bytes()


@pytest.mark.parametrize("field, value, words", [
    ("tensorrt", "10.1.0", "TensorRT mismatch"),
    ("compute_capability", "9.0", "GPU mismatch"),
    ("platform", "linux-aarch64", "platform mismatch"),
])
def test_a_manifest_from_elsewhere_is_refused_in_one_line(fp32_plan, checkpoint, field, value, words):
    sidecar = fp32_plan.with_name(fp32_plan.name + ".json")
    sidecar.write_text(json.dumps({**manifest_of(fp32_plan), field: value}))
    result = run("verify", fp32_plan, *MODEL, "--weights", checkpoint)
    assert_one_line_error(result, "cannot run here: built with TensorRT")
    assert words in result.stderr and value in result.stderr


def test_another_gpu_model_of_the_same_compute_capability_is_a_warning(fp32_plan, checkpoint, monkeypatch):
    from resnet_export.runtime import device

    monkeypatch.setattr(device, "current", lambda: HostDevice(name="NVIDIA GeForce RTX 4090 (double)"))
    result = run("verify", fp32_plan, *MODEL, "--weights", checkpoint)
    assert result.exit_code == 0, result.output
    assert f"built on {HOST_GPU} and runs on NVIDIA GeForce RTX 4090 (double)" in result.stderr


def test_a_version_compatible_plan_without_a_manifest_runs(trt_double, resnet18_onnx, checkpoint, tmp_path):
    """trtexec --versionCompatible writes no sidecar: the runtime must still be allowed its host code."""
    plan = tmp_path / "vc.plan"
    assert run("trt", "--onnx", resnet18_onnx.path, "--version-compatible", "--opt-batch", "4", "--max-batch", "4", "-o", plan).exit_code == 0
    plan.with_name(plan.name + ".json").unlink()
    runner = TrtRunner(plan)
    assert runner.runtime.engine_host_code_allowed
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    from resnet_export.runtime.runners import OrtRunner

    np.testing.assert_allclose(runner.infer(x), OrtRunner(resnet18_onnx.path).infer(x), rtol=1e-5, atol=1e-5)


def test_a_plan_of_another_tensorrt_fails_to_deserialize_in_one_line(fp32_plan, monkeypatch, checkpoint):
    """Without a manifest nothing is checked beforehand: the deserializer's refusal is the one line."""
    fp32_plan.with_name(fp32_plan.name + ".json").unlink()
    monkeypatch.setattr(double, "__version__", "11.4.0.106+double")
    result = run("verify", fp32_plan, *MODEL, "--weights", checkpoint, "--precision", "fp32")
    assert_one_line_error(result, "TensorRT could not deserialize")


def test_runner_checks_the_profile_and_graphs_keep_each_shapes_output(fp32_plan):
    from resnet_export.engine.tensorrt import EngineError

    plain, graphs = TrtRunner(fp32_plan), TrtRunner(fp32_plan, cuda_graph=True)
    with pytest.raises(EngineError, match=r"batch shape \[9, 3, 64, 64\] is outside the engine's profile \(batch 1 to 8\)"):
        plain.infer(np.zeros((9, 3, 64, 64), np.float32))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 64, 64), dtype=np.float32) for n in (2, 4, 2, 4)]
    kept = [graphs.infer(b) for b in batches]  # shapes alternate: captured once each, then replayed
    assert sorted(graphs._graphs) == [(2, 3, 64, 64), (4, 3, 64, 64)] and graphs.cuda_graph
    for batch, out in zip(batches, kept):
        np.testing.assert_allclose(out, plain.infer(batch), rtol=1e-5, atol=1e-5)


def test_one_runner_called_from_several_threads_gives_each_call_its_own_output(fp32_plan, monkeypatch):
    """Calls share one context: each call's shape, addresses and enqueue must stay together. The double's
    set_tensor_address lets other threads run (as a binding that releases the GIL would), so calls that
    were not kept together would run with another call's shape and addresses."""
    import time

    runner = TrtRunner(fp32_plan)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 3, 64, 64), dtype=np.float32) for n in (1, 2, 3, 4)]
    expected = [runner.infer(b) for b in batches]
    original = double.IExecutionContext.set_tensor_address

    def set_and_yield(self, name, memory):
        done = original(self, name, memory)
        time.sleep(0.002)
        return done

    monkeypatch.setattr(double.IExecutionContext, "set_tensor_address", set_and_yield)
    failures = []

    def work(i):
        try:
            for _ in range(5):
                out = runner.infer(batches[i])
                if out.shape != expected[i].shape or not np.allclose(out, expected[i], atol=1e-5):
                    failures.append(i)
        except Exception as exc:  # an exception in a thread would pass the test unseen
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def _save_build(onnx_path, out, cache, opt):
    """One `trt` build into a shared timing cache, in a process of its own with the double installed."""
    import sys

    from resnet_export.runtime import device
    from resnet_export.engine.build import BatchProfile, BuildOptions, build_engine

    sys.modules["tensorrt"] = double
    device.current = lambda: HostDevice()
    build_engine(onnx_path, out, BatchProfile(1, opt, 8), BuildOptions(timing_cache=str(cache)))


@pytest.mark.slow
def test_builds_merge_their_timing_cache_entries(trt_double, resnet18_onnx, tmp_path):
    """Two builds (other opt shapes) in two processes into one cache: it ends with both builds' entries."""
    import multiprocessing

    cache = tmp_path / "timing.cache"
    context = multiprocessing.get_context("spawn")
    builds = [context.Process(target=_save_build, args=(str(resnet18_onnx.path), str(tmp_path / f"{opt}.plan"),
                                                          str(cache), opt)) for opt in (2, 4)]
    for build in builds:
        build.start()
    for build in builds:
        build.join(timeout=120)
        assert build.exitcode == 0
    entries = json.loads(cache.read_bytes())["entries"]
    assert {e.split("@")[1] for e in entries} == {"(2, 3, 64, 64)", "(4, 3, 64, 64)"} and len(entries) == 40


def _qdq_model(path):
    """A small Q/DQ conv net made elsewhere: no toolkit metadata, only its graph says it is INT8."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    fc = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc")
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Conv", ["dq", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [weight, scale, zero, fc])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=10), path)
    return path


def test_a_foreign_qdq_onnx_is_int8_in_the_plan_manifest_inspect_and_triton(trt_double, tmp_path):
    source = _qdq_model(tmp_path / "foreign.onnx")
    info = json.loads(run("inspect", source, "--json").stdout)
    assert info["precision"] == {"dtype": "int8", "from": "its graph (Q/DQ nodes)"}
    plan = tmp_path / "foreign.plan"
    result = run("trt", "--onnx", source, "--opt-batch", "4", "--max-batch", "4", "-o", plan)
    assert result.exit_code == 0, result.output
    assert manifest_of(plan)["precision"]["dtype"] == "int8"
    assert manifest_of(plan)["verification"]["gate"]["min_top1_agreement"] == 0.97  # the INT8 gate, not FP32's
    entry = run("triton", source, "--repo", tmp_path / "repo", "--ort-trt")
    assert entry.exit_code == 0, entry.output
    assert 'value: "INT8"' in (tmp_path / "repo" / "foreign" / "config.pbtxt").read_text().replace("\n", " ").replace(
        "  ", " ")


@pytest.mark.slow
def test_bench_runs_a_plan_per_batch_and_says_the_rows_ran_on_the_double(trt_double, tmp_path):
    report = tmp_path / "report"
    args = ["bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends", "torch,trt",
            "--precisions", "fp32", "--batch-sizes", "1,4", "--warmup", "0", "--iters", "2", "--report", report]
    result = run(*args)
    assert result.exit_code == 0, result.output
    data = json.loads((report / "report.json").read_text())
    trt_rows = [r for r in data["rows"] if r["backend"] == "trt"]
    assert [(r["batch"], r["status"]) for r in trt_rows] == [(1, "ok")] * 2 + [(4, "ok")] * 2
    assert [r["timing"].split(", ")[-1] for r in trt_rows] == ["profile 1/1/1"] * 2 + ["profile 1/4/4"] * 2
    assert all(r["top1_agreement"] == 1.0 for r in trt_rows)
    assert trt_rows[0]["timing"].startswith("host wall clock (TensorRT double, not a GPU figure)")
    assert data["environment"]["gpu"] == HOST_GPU and data["environment"]["versions"]["tensorrt"].endswith("+double")
    markdown = (report / "report.md").read_text()
    assert f"GPU: {HOST_GPU}" in markdown and "tensorrt 10.16.1.11+double" in markdown
    plans = sorted(p.name.split("-trt")[0] for p in (report / "artifacts").rglob("*.plan"))
    assert plans == ["fp32-b1-1-1", "fp32-b1-4-4"]


@pytest.mark.slow
def test_bench_on_another_gpu_model_builds_its_own_plans_and_cache(trt_double, tmp_path, monkeypatch):
    """An L4 and an RTX 4090 are both 8.9: the second GPU must not pick up the first one's timing cache
    (setTimingCache refuses it) or plans, in a report folder they share."""
    from resnet_export.runtime import device

    report = tmp_path / "report"
    args = ["bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "32", "--backends", "trt",
            "--precisions", "fp32", "--batch-sizes", "2", "--warmup", "0", "--iters", "1", "--report", report]
    for name in ("NVIDIA L4 (double)", "NVIDIA GeForce RTX 4090 (double)"):
        monkeypatch.setattr(device, "current", lambda name=name: HostDevice(name=name))
        result = run(*args)
        assert result.exit_code == 0, result.output
        rows = json.loads((report / "report.json").read_text())["rows"]
        assert {r["status"] for r in rows} == {"ok"}, rows
    assert len(list((report / "artifacts").rglob("timing-*.cache"))) == 2
    assert len(list((report / "artifacts").rglob("*.plan"))) == 2


@pytest.mark.slow
def test_an_int8_onnx_handed_off_alone_gates_its_plan_against_what_it_stands_for(trt_double, digits_r18, tmp_path,
                                                                                 monkeypatch):
    """The README's hand-off: `quantize` on one machine, the INT8 ONNX copied alone (no manifest) to another, `trt
    --onnx` there. Its plan is gated against the logits the ONNX recorded at quantize time (the FP32 ONNX's, which
    matched PyTorch), never against itself on ONNX Runtime, and says so; `verify PLAN` needs no model for it; the
    inspector counts every INT8 conv, the stem fused with its pooling (ConvActPool) included; a doctored plan fails."""
    import shutil

    from resnet_export.onnx_graph import quantized_convs

    made, elsewhere = tmp_path / "cpu-machine", tmp_path / "gpu-machine"
    made.mkdir(), elsewhere.mkdir()
    quantized = run("quantize", digits_r18.fp32, "--int8", "--calib", digits_r18.train, "--calib-size", "64",
                    "--val", digits_r18.val, "-o", made / "r18.int8.onnx")
    assert quantized.exit_code == 0, quantized.output
    shutil.copyfile(made / "r18.int8.onnx", elsewhere / "r18.int8.onnx")
    plan = elsewhere / "r18.plan"
    built = run("trt", "--onnx", elsewhere / "r18.int8.onnx", "--max-batch", "16", "-o", plan)
    assert built.exit_code == 0, built.output
    line = built.stdout.strip().splitlines()[-1]
    assert "INT8 engine" in line and "(on ONNX Runtime; it matched PyTorch FP32 to a relative error of" \
        in line and "logits recorded at quantize time on" in line and "(batches 1,8,16)" in line, line
    assert "records no reference" not in line
    verified = run("verify", plan)  # no MODEL: the reference the plan's ONNX carries
    assert verified.exit_code == 0 and "recorded at quantize time" in verified.stdout, verified.output
    engine = json.loads(run("inspect", plan, "--json").stdout)["engine"]
    assert "ConvActPool" in {layer["type"] for layer in engine["layers"]}
    assert engine["convolutions"] == {"INT8": len(quantized_convs(onnx.load(str(elsewhere / "r18.int8.onnx"))))}
    run_engine = double.ICudaEngine._run
    monkeypatch.setattr(double.ICudaEngine, "_run", lambda self, batch: run_engine(self, batch)[:, ::-1].copy())
    doctored = run("verify", plan)
    assert doctored.exit_code == 3 and "failed the INT8 gate" in doctored.output, doctored.output
