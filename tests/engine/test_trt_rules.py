"""What real TensorRT refuses, held against the toolkit on the double: each test fails when trt.py breaks the rule.

The rules (tests/trt_double/tensorrt.py cites NVIDIA's source for each): typed networks need STRONGLY_TYPED on 10.x;
tensor addresses and device memory are 256-byte aligned; an unreadable timing cache gives no usable cache; queued
work runs when its stream is synchronized, after the streams it waited for; plans are gated by what their weights
can show, against the reference their ONNX recorded. Tiny hand-made graphs keep them in the quick loop.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from resnet_export.engine import build as trt
from resnet_export.engine import tensorrt
from resnet_export.errors import GateFailed
from resnet_export.engine.build import BatchProfile, BuildOptions, build_engine
from resnet_export.engine.tensorrt import EngineError
from resnet_export.engine.runner import TrtRunner

from ..trt_double import HostStream, install
from ..trt_double import tensorrt as double

CHW = (3, 8, 8)


def tiny_onnx(path, fp16: bool = False, seed: int = 0, opset: int = 20):
    """input (N, 3, 8, 8) -> Conv 3x3 (4 channels) -> GlobalAveragePool -> Flatten -> logits (N, 4); ``fp16``: the
    conv computes in float16 between two Casts (typed as AutoCast's graphs are)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float16 if fp16 else np.float32)
    nodes, source = [], "input"
    if fp16:
        nodes.append(helper.make_node("Cast", ["input"], ["half"], to=TensorProto.FLOAT16))
        source = "half"
    nodes += [helper.make_node("Conv", [source, "w"], ["conv"], pads=[1, 1, 1, 1]),
              helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat" if fp16 else "logits"])]
    if fp16:
        nodes.append(helper.make_node("Cast", ["flat"], ["logits"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *CHW])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _inputs(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *CHW)).astype(np.float32)


def _ort(path, x):
    from resnet_export.runtime.runners import OrtRunner

    return OrtRunner(path).infer(x)


# --------------------------------------------------------------------------- network flags per version


@pytest.mark.parametrize("version, builds", [("10.16.1.11+double", False), ("11.4.0.106+double", True)])
def test_a_weakly_typed_fp16_network_builds_only_where_typing_is_always_strong(monkeypatch, tmp_path, version, builds):
    """The double's rule: on 10.x create_network(0) (no STRONGLY_TYPED) cannot build FP16 types as typed; on 11.x the
    flag is ignored. The toolkit's own build sets the flag, so it builds on both."""
    install(monkeypatch, version=version)
    path = tiny_onnx(tmp_path / "half.onnx", fp16=True)
    builder = double.Builder(tensorrt.logger())
    for flags, expected in ((0, builds), (1 << int(double.NetworkDefinitionCreationFlag.STRONGLY_TYPED), True)):
        network = builder.create_network(flags)
        assert double.OnnxParser(network, tensorrt.logger()).parse_from_file(str(path))
        config, profile = builder.create_builder_config(), builder.create_optimization_profile()
        profile.set_shape("input", (1, *CHW), (1, *CHW), (2, *CHW))
        config.add_optimization_profile(profile)
        assert (builder.build_serialized_network(network, config) is not None) == expected
    build_engine(path, tmp_path / "half.plan", BatchProfile(1, 1, 2))  # the toolkit's network is strongly typed


# --------------------------------------------------------------------------- 256-byte addresses


def test_tensor_addresses_and_device_memory_must_be_256_byte_aligned(trt_double, tmp_path):
    path = tiny_onnx(tmp_path / "m.onnx")
    plan = tmp_path / "m.plan"
    build_engine(path, plan, BatchProfile(1, 2, 2))
    runner = TrtRunner(plan)
    context = runner.engine.create_execution_context(double.ExecutionContextAllocationStrategy.USER_MANAGED)
    aligned = trt_double.empty((2, *CHW), torch.float32)
    assert context.set_tensor_address("input", aligned.data_ptr())
    assert not context.set_tensor_address("input", aligned.data_ptr() + 64)  # element-aligned, not 256
    scratch = trt_double.empty((runner.engine.device_memory_size_v2 + 256,), torch.uint8)
    context.set_device_memory(scratch.data_ptr() + 128, runner.engine.device_memory_size_v2)
    assert context._memory is None  # refused


def test_the_runner_feeds_tensorrt_an_aligned_copy_of_a_view_at_an_offset(trt_double, tmp_path):
    """A slice of a device tensor starts wherever the slice does; the runner copies it into an aligned buffer of the
    device's own instead of handing TensorRT an address it refuses."""
    path = tiny_onnx(tmp_path / "m.onnx")
    plan = tmp_path / "m.plan"
    build_engine(path, plan, BatchProfile(1, 2, 2))
    runner = TrtRunner(plan)
    x = _inputs(3)
    flat = trt_double.upload(np.concatenate([np.zeros(16, np.float32), x[:2].ravel()]))
    view = flat[16:].view(2, *CHW)  # 64 bytes past an aligned start
    assert view.data_ptr() % 256
    np.testing.assert_allclose(runner.infer_device(view).numpy(), _ort(path, x[:2]), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- streams


def test_queued_work_runs_when_its_stream_is_synchronized_after_what_it_waited_for(trt_double, tmp_path):
    """The double queues execute_async_v3 on the engine's stream and the upload on the current one: the runner's
    output is right only with follow_current (the input lands), on(stream) (buffers made on the engine's stream)
    and synchronize (the run happens before the output is read)."""
    path = tiny_onnx(tmp_path / "m.onnx")
    plan = tmp_path / "m.plan"
    build_engine(path, plan, BatchProfile(1, 2, 2))
    runner = TrtRunner(plan)
    x = _inputs(2)
    out = runner.enqueue(trt_double.upload(x))
    assert runner.stream.queued  # queued, not yet run: the output is not written
    trt_double.synchronize(runner.stream)
    np.testing.assert_allclose(out.numpy(), _ort(path, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runner.infer(x), _ort(path, x), rtol=1e-4, atol=1e-5)  # infer_device synchronizes


def test_a_buffer_of_another_stream_not_waited_for_is_refused(trt_double, tmp_path):
    path = tiny_onnx(tmp_path / "m.onnx")
    plan = tmp_path / "m.plan"
    build_engine(path, plan, BatchProfile(1, 2, 2))
    runner = TrtRunner(plan)
    other = HostStream()
    with trt_double.on(other):
        stranger = trt_double.empty((2, *CHW), torch.float32)  # made on a stream the engine's never waited for
    context = runner.engine.create_execution_context(double.ExecutionContextAllocationStrategy.USER_MANAGED)
    context.set_device_memory(runner.scratch.data_ptr(), runner.scratch.numel())
    context.set_input_shape("input", (2, *CHW))
    output = trt_double.empty((2, 4), torch.float32)
    assert context.set_tensor_address("input", stranger.data_ptr()) and context.set_tensor_address(
        "logits", output.data_ptr())
    assert not context.execute_async_v3(trt_double.handle(runner.stream))
    runner.stream.waited[other] = next(trt_double._moments)  # once it has waited for that stream, it may
    trt_double.follow_current(runner.stream, stranger)
    assert context.execute_async_v3(trt_double.handle(runner.stream))


# --------------------------------------------------------------------------- timing cache


@pytest.mark.parametrize("unreadable", ["null", "raise", "empty"])
def test_an_unreadable_timing_cache_is_a_one_line_error_and_is_left_as_it_is(trt_double, monkeypatch, tmp_path,
                                                                            unreadable):
    """However TensorRT answers a blob it cannot read (null, an exception, or an empty cache), the build stops with
    one line and the user's file keeps its bytes: never overwritten by the build that could not read it."""
    monkeypatch.setattr(double, "_UNREADABLE_TIMING_CACHE", unreadable)
    path = tiny_onnx(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00not a timing cache of this TensorRT")
    with pytest.raises(EngineError, match="cannot be read by this TensorRT: it is left as it is"):
        build_engine(path, tmp_path / "m.plan", BatchProfile(1, 1, 2), BuildOptions(timing_cache=str(cache)))
    assert cache.read_bytes() == b"\x00not a timing cache of this TensorRT"
    assert not (tmp_path / "m.plan").exists()


def test_a_cache_that_cannot_be_merged_at_save_time_is_left_as_it_is(trt_double, monkeypatch, tmp_path, caplog):
    """Another build replaced the file with a cache of another TensorRT while this one built: this build's timings
    are not saved, and the other's file is kept."""
    path = tiny_onnx(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    foreign = json.dumps({"origin": ["9.0.0", "other GPU", "8.0"], "entries": ["x@1"]}).encode()
    original = trt.merge_timing_cache

    def replaced_meanwhile(where, merge):
        cache.write_bytes(foreign)
        return original(where, merge)

    monkeypatch.setattr(trt, "merge_timing_cache", replaced_meanwhile)
    build_engine(path, tmp_path / "m.plan", BatchProfile(1, 1, 2), BuildOptions(timing_cache=str(cache)))
    assert cache.read_bytes() == foreign and "it is left as it is" in caplog.text


# --------------------------------------------------------------------------- inspector layer kinds


def test_convolutions_are_counted_by_the_inspectors_parameter_types_a_fused_stem_included():
    """Shaped as NVIDIA's inspector reports an INT8 ResNet-18 (trt-engine-explorer, examples/pytorch/resnet/A100/
    qat-residual-qgap): the stem conv is fused with its pooling into a ConvActPool layer, the others are
    CaskConvolution; a pooling layer and a reformat are not convolutions."""
    from resnet_export.engine.inspector import convolution_precisions, engine_layers

    int8 = [{"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]
    information = {"Layers": [
        {"Name": "QuantizeLinear_2", "LayerType": "Reformat", "ParameterType": "Reformat",
         "Inputs": [{"Format/Datatype": "Row major linear FP32"}], "Outputs": int8},
        {"Name": "conv1.weight + QuantizeLinear_7 + Conv_9 + MaxPool_12", "LayerType": "ConvActPool",
         "ParameterType": "ConvActPool", "ConvParameterType": "Convolution",
         "Inputs": [{"Format/Datatype": "Row major Int8 format"}], "Outputs": int8},
        {"Name": "layer1.0.conv1.weight + QuantizeLinear_20 + Conv_22", "LayerType": "CaskConvolution",
         "ParameterType": "Convolution", "Inputs": int8, "Outputs": int8},
        {"Name": "MaxPool_2", "LayerType": "CudaPooling", "ParameterType": "Pooling", "Inputs": int8, "Outputs": int8},
    ]}
    assert convolution_precisions(engine_layers(information)) == {"INT8": 2}


# --------------------------------------------------------------------------- gates a real engine can pass


@pytest.fixture
def random_onnx(tmp_path):
    """The tiny graph marked as exported with random weights (what the toolkit's metadata says of such a model)."""
    from resnet_export.onnx_graph import set_metadata

    path = tiny_onnx(tmp_path / "random.onnx")
    model = onnx.load(str(path))
    set_metadata(model, {"source": {"arch": "tiny", "weights": None}})
    onnx.save(model, str(path))
    return path


def test_a_random_weight_plan_with_rounding_noise_passes_and_a_wrong_binding_or_batch_fails(trt_double, random_onnx,
                                                                                          monkeypatch, tmp_path):
    """Random weights: gated on fidelity (its top-1 decisions are near-ties, one flips on rounding), against its ONNX
    here (it records no reference). The double adds FP32 rounding; turned up a hundredfold it still passes. An
    engine that reads another row (a wrong binding) or answers every row with the first (a wrong batch) fails."""
    from resnet_export.pipeline import engine_from_onnx

    monkeypatch.setitem(double._ROUNDING, "fp32", 1e-4)
    result = engine_from_onnx(random_onnx, tmp_path / "ok.plan", profile=BatchProfile(1, 4, 8))
    assert result.verification.gate.min_top1_agreement == 0.0 and result.verification.metrics["max_rel_err"] > 1e-5
    assert result.verification.batch_sizes == [1, 4, 8] and "records no reference" in result.verification.reference
    run = double.ICudaEngine._run
    for broken in (lambda batch: np.roll(batch, 1, axis=0), lambda batch: np.repeat(batch[:1], len(batch), axis=0)):
        monkeypatch.setattr(double.ICudaEngine, "_run", lambda self, batch, broken=broken: run(self, broken(batch)))
        # the input-dependent part tells it (the plain cosine's failure prints "min cosine" too, and may not fail)
        with pytest.raises(GateFailed, match="min cosine of the input-dependent part"):
            engine_from_onnx(random_onnx, tmp_path / "broken.plan", profile=BatchProfile(1, 4, 8))
        monkeypatch.setattr(double.ICudaEngine, "_run", run)


class TorchStandIn:
    """What PyTorch computes for the hand-made tiny ONNX (it has no torch module): its logits, less ``shift`` on the
    first class, named as the toolkit's PyTorch runner is, so a record can differ from the ONNX it is stored in."""

    name = "torch"

    def __init__(self, path, shift: float = 0.0):
        from resnet_export.runtime.runners import OrtRunner

        self.onnx, self.shift = OrtRunner(path), shift

    def infer(self, batch):
        logits = self.onnx.infer(batch)
        logits[:, 0] -= self.shift
        return logits


def test_a_record_is_refused_unless_it_comes_from_what_it_says_and_never_from_the_artifact_itself(tmp_path):
    """A record said to be PyTorch's made by ONNX Runtime, or an artifact's record made from its own outputs, would
    let a plan (or the artifact) pass against itself."""
    from resnet_export.data import Inputs
    from resnet_export.preprocessing import Preprocessing
    from resnet_export.checks.reference_record import RecordError, attach, make_record
    from resnet_export.runtime.runners import OrtRunner

    path = tiny_onnx(tmp_path / "m.onnx")
    spec = Preprocessing(input_size=CHW[1:], resize=8, mean=(0.0,) * 3, std=(1.0,) * 3, channels=3)
    inputs = Inputs(_inputs(3), None, "3 test inputs")
    with pytest.raises(RecordError, match="recorded as PyTorch FP32's was computed by ort:m.onnx"):
        make_record(inputs, OrtRunner(path), spec, "PyTorch FP32", "export")
    own = make_record(inputs, OrtRunner(path), spec, "FP32 ONNX m.onnx", "quantize")
    with pytest.raises(RecordError, match="computed by .*m.onnx itself"):
        attach(path, own)
    other = tmp_path / "other.onnx"
    other.write_bytes(path.read_bytes())
    attach(other, own)  # the same logits recorded in another file: a reference for that one


def test_a_plan_is_gated_against_its_record_and_never_a_replay_of_its_onnx(trt_double, tmp_path):
    """A record that differs from what the ONNX computes (PyTorch disagreeing with its export) fails the plan, though
    the plan matches the ONNX exactly: the gate reads the record."""
    from resnet_export.data import Inputs
    from resnet_export.pipeline import engine_from_onnx
    from resnet_export.preprocessing import Preprocessing
    from resnet_export.checks.reference_record import attach, make_record

    path = tiny_onnx(tmp_path / "m.onnx")
    spec = Preprocessing(input_size=CHW[1:], resize=8, mean=(0.0,) * 3, std=(1.0,) * 3, channels=3)
    attach(path, make_record(Inputs(_inputs(3), None, "3 test inputs"), TorchStandIn(path, shift=50.0), spec,
                             "PyTorch FP32", "export"))
    with pytest.raises(GateFailed, match="recorded at export time"):
        engine_from_onnx(path, tmp_path / "m.plan", profile=BatchProfile(1, 2, 3))


def test_a_plan_is_gated_against_the_reference_its_onnx_recorded_at_every_profile_batch(trt_double, tmp_path,
                                                                                         monkeypatch):
    """An ONNX that carries PyTorch's logits on its verification inputs gates its plan against them, repeated to run
    the profile's smallest, tuned and largest batch, and says so."""
    from resnet_export.checks import reference_record
    from resnet_export.data import Inputs
    from resnet_export.pipeline import engine_from_onnx
    from resnet_export.preprocessing import Preprocessing
    from resnet_export.checks.reference_record import attach, make_record, read_record
    from resnet_export.runtime.runners import OrtRunner

    path = tiny_onnx(tmp_path / "m.onnx")
    spec = Preprocessing(input_size=CHW[1:], resize=8, mean=(0.0,) * 3, std=(1.0,) * 3, channels=3)
    attach(path, make_record(Inputs(_inputs(3), None, "3 test inputs"), TorchStandIn(path), spec, "PyTorch FP32",
                             "export"))
    recorded = read_record(path)
    assert recorded.inputs.shape == (3, *CHW) and recorded.logits.shape == (3, 4)
    result = engine_from_onnx(path, tmp_path / "m.plan", profile=BatchProfile(2, 4, 5))
    v = result.verification
    assert v.reference == "PyTorch FP32 logits recorded at export time on 3 test inputs"
    assert v.batch_sizes == [2, 4, 5] and v.metrics["samples"] == 11  # every batch full, the 3 inputs repeated
    assert v.metrics["min_centered_cosine"] > 0.99  # the rows told apart

    monkeypatch.setattr(reference_record, "BUDGET", 1)  # an input too large for the budget (224x224 FP16: 294 kB)
    kept = make_record(Inputs(_inputs(3), None, "3 test inputs"), TorchStandIn(path), spec, "PyTorch FP32", "export")
    assert kept["samples"] == 2  # two at least, else a plan answering rows with other rows would pass
