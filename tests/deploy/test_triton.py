"""`triton`: model repository entries, validated as Triton's own ModelConfig; a live server where one exists.

Plan entries are made from plans built on the TensorRT double (tests/trt_double): what `triton` reads of a plan
is its manifest, written by the same code as a real build's.
"""

import json
import re
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

# Skipped, with the reason, where tritonclient is not installed (a GPU image: `make gpu-check` collects this module)
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient is not installed (pip install '.[triton]')")
text_format = pytest.importorskip("google.protobuf.text_format")

from resnet_export.manifest import write_manifest

from ..conftest import IMAGES
from ..test_cli import assert_one_line_error, run
from ..trt_double import HOST_GPU
from ..trt_double.tensorrt import __version__ as DOUBLE


def _config(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_fp32_onnx_entry(resnet18_onnx, tmp_path):
    labels = tmp_path / "names.txt"
    labels.write_text("cat\ncup\nlogo\nperson\nrocket\n")
    repo = tmp_path / "repo"
    result = run("triton", resnet18_onnx.path, "--repo", repo, "--labels", labels, "--instances", "2")
    assert result.exit_code == 0, result.output
    model_dir = repo / "resnet18"
    config = _config(model_dir)
    assert config.name == "resnet18" and config.backend == "onnxruntime" and config.max_batch_size == 32
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, 64, 64])]  # no batch axis
    assert config.output[0].name == "logits" and list(config.output[0].dims) == [5]
    assert config.output[0].label_filename == "labels.txt"
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert not config.dynamic_batching.preferred_batch_size  # Triton's advice: leave it out
    assert [w.batch_size for w in config.model_warmup] == [1, 32]
    assert config.instance_group[0].count == 2
    assert json.loads(config.parameters["preprocessing_mean"].string_value) == [0.485, 0.456, 0.406]
    assert config.parameters["preprocessing_interpolation"].string_value == "bilinear"  # a string as it is
    assert (model_dir / "1" / "model.onnx").read_bytes() == resnet18_onnx.path.read_bytes()
    assert (model_dir / "labels.txt").read_text().split() == ["cat", "cup", "logo", "person", "rocket"]
    readme = (model_dir / "README.md").read_text()
    assert 'client.infer("resnet18"' in readme and "class_count=5" in readme


def test_fixed_batch_onnx_is_served_without_batching(resnet18_b4_onnx, tmp_path):
    fixed = resnet18_b4_onnx.path
    result = run("triton", fixed, "--repo", tmp_path / "repo", "--ort-trt")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "repo" / "b4" / "config.pbtxt").read_text()
    assert text.startswith("max_batch_size: 0\n")  # said explicitly: proto3 would drop it
    config = _config(tmp_path / "repo" / "b4")
    assert list(config.input[0].dims) == [4, 3, 64, 64] and not config.HasField("dynamic_batching")
    assert "np.stack([preprocess(\"image.jpg\")] * 4)" in (tmp_path / "repo" / "b4" / "README.md").read_text()
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP32"
    assert_one_line_error(run("triton", fixed, "--repo", tmp_path / "other", "--max-batch", "8"),
                          "fixed batch: it is served with max_batch_size 0")


def test_config_is_checked_against_the_artifact_and_each_check_can_fail(resnet18_onnx, resnet18_b4_onnx, tmp_path):
    from resnet_export.deploy.triton import TritonError, check_config

    artifact = resnet18_onnx.path
    assert run("triton", artifact, "--repo", tmp_path / "repo", "--name", "r18", "--max-queue-delay-us", "250").exit_code == 0
    text = (tmp_path / "repo" / "r18" / "config.pbtxt").read_text()
    assert _config(tmp_path / "repo" / "r18").dynamic_batching.max_queue_delay_microseconds == 250
    check_config(text, artifact, "r18", 32)  # what was written passes
    doctored = {
        "name r18x != folder r18": text.replace('name: "r18"', 'name: "r18x"', 1),
        "max_batch_size 4 != 32": text.replace("max_batch_size: 32", "max_batch_size: 4"),
        "names or types differ": text.replace("data_type: TYPE_FP32", "data_type: TYPE_FP16", 1),
        "dims of 'input' differ": text.replace("dims: 64", "dims: 32", 1),
    }
    for message, wrong in doctored.items():
        with pytest.raises(TritonError, match=re.escape(message)):
            check_config(wrong, artifact, "r18", 32)
    with pytest.raises(TritonError, match="batching needs a dynamic dim 0"):  # a batching config on a fixed batch
        check_config(text, resnet18_b4_onnx.path, "r18", 32)


def test_openvino_backend_entry_is_checked_against_the_model_as_openvino_reads_it(resnet18_onnx, tmp_path):
    from resnet_export.deploy.triton import TritonError, check_config

    artifact = resnet18_onnx.path
    result = run("triton", artifact, "--repo", tmp_path / "repo", "--name", "r18", "--backend", "openvino")
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "repo" / "r18"
    config = _config(model_dir)
    assert config.backend == "openvino" and config.default_model_filename == "model.onnx"  # its default: model.xml
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU  # auto -> its only kind
    assert {k: config.parameters[k].string_value for k in ("PERFORMANCE_HINT", "NUM_STREAMS")} == \
        {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, 64, 64])] and config.max_batch_size == 32
    assert (model_dir / "1" / "model.onnx").read_bytes() == artifact.read_bytes()
    assert "Triton's openvino backend" in (model_dir / "README.md").read_text()
    text = (model_dir / "config.pbtxt").read_text()
    check_config(text, artifact, "r18", 32)
    doctored = {
        "reads an ONNX only as default_model_filename model.onnx": text.replace('"model.onnx"', '"model.xml"'),
        "runs on CPU instances only": text.replace("KIND_CPU", "KIND_GPU"),
        "names or types differ": text.replace('name: "logits"', 'name: "output"'),
        "dims of 'input' differ": text.replace("dims: 64", "dims: 32", 1),
    }
    for message, wrong in doctored.items():
        with pytest.raises(TritonError, match=re.escape(message)):
            check_config(wrong, artifact, "r18", 32)


@pytest.mark.parametrize("args, message", [
    (["--kind", "gpu"], "Triton's openvino backend runs on CPU instances only: use --kind cpu or auto"),
    (["--ort-trt"], "--ort-trt is ONNX Runtime's TensorRT accelerator for an ONNX on a GPU instance"),
])
def test_openvino_backend_errors_write_nothing(resnet18_onnx, tmp_path, args, message):
    assert_one_line_error(run("triton", resnet18_onnx.path, "--repo", tmp_path / "repo", "--backend", "openvino", *args),
                          message)
    assert not (tmp_path / "repo").exists()


def test_readme_snippet_preprocesses_as_the_toolkit(resnet18_small, tmp_path):
    """The client snippet's preprocess() must give the tensor image_stream.load_image gives, for a non-square input."""
    from PIL import Image

    from resnet_export.data import find_images
    from resnet_export.image_stream import load_image
    from resnet_export.onnx_graph import onnx_preprocessing
    from resnet_export.pipeline import onnx_from_model

    from ..conftest import loaded

    model = loaded(arch="resnet18", num_classes=5, input_size=(48, 64))
    artifact = onnx_from_model(model, tmp_path / "wide.onnx", run_verification=False).path
    assert run("triton", artifact, "--repo", tmp_path / "repo").exit_code == 0
    readme = (tmp_path / "repo" / "wide" / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("\nwith grpcclient")[0]
    namespace = {}
    exec(code, namespace)  # the snippet's imports and preprocess(), as a user would paste them
    spec = onnx_preprocessing(artifact)
    for path in find_images(IMAGES)[0]:
        np.testing.assert_allclose(namespace["preprocess"](path), load_image(path, spec), atol=1e-6,
                                   err_msg=f"{path.name} {Image.open(path).size}")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_fp16_and_int8_onnx_entries(resnet18_onnx, resnet18_cpu_int8, tmp_path, precision):
    from resnet_export.pipeline import PrecisionRequest, precision_from_onnx

    made = resnet18_cpu_int8 if precision == "int8" else precision_from_onnx(
        resnet18_onnx.path, tmp_path / "r18-fp16.onnx", PrecisionRequest("fp16")).path
    result = run("triton", made, "--repo", tmp_path / "repo", "--ort-trt", "--preferred-batch", "4,8",
                 "--name", f"r18-{precision}")
    assert result.exit_code == 0, result.output
    config = _config(tmp_path / "repo" / f"r18-{precision}")
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32  # FP32 I/O kept by both conversions
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    parameters = config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
    assert parameters["precision_mode"] == precision.upper()
    assert parameters["trt_profile_max_shapes"] == "input:32x3x64x64"  # the default max batch, as trt's
    if precision == "int8":  # the CPU-target INT8 on Triton's openvino backend, checked as OpenVINO reads it
        result = run("triton", made, "--repo", tmp_path / "repo", "--name", "ov", "--backend", "openvino",
                     "--kind", "cpu")
        assert result.exit_code == 0, result.output
        served = tmp_path / "repo" / "ov" / "1" / "model.onnx"
        assert _config(tmp_path / "repo" / "ov").backend == "openvino" and served.read_bytes() == made.read_bytes()


def write_plan(folder, onnx_path, *, profile=(1, 8, 16), options=None, name="r18"):
    """A plan and its manifest, built by the trt layer's own code on the TensorRT double (``trt_double``
    must be installed): what `triton` reads of it is what a real build writes."""
    from resnet_export.engine.build import BatchProfile, BuildOptions, build_engine

    path = folder / f"{name}.plan"
    build = build_engine(onnx_path, path, BatchProfile(*profile), BuildOptions(**(options or {})))
    write_manifest(path, stage="engine", **build.to_dict(), verification=None)
    return path


@pytest.fixture
def plan(trt_double, resnet18_onnx, tmp_path):
    return write_plan(tmp_path, resnet18_onnx.path)


def triton_plan_file(model_dir, config, cc: str):
    """The file Triton's TensorRT backend loads on a GPU of compute capability ``cc``: ``cc_model_filenames[cc]``,
    else ``default_model_filename`` (backend's BackendModelInstance), else ``model.plan`` (tensorrt_backend's
    ModelInstanceState::Create); the model fails to load when that file is missing."""
    name = dict(config.cc_model_filenames).get(cc) or config.default_model_filename or "model.plan"
    return model_dir / "1" / name


def test_plan_entry_runs_only_where_it_was_built(plan, tmp_path):
    result = run("triton", plan, "--repo", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "repo" / "r18"
    config = _config(model_dir)
    assert config.backend == "tensorrt" and config.max_batch_size == 16  # the profile's maximum
    assert dict(config.cc_model_filenames) == {"8.9": "model.8.9.plan"} and not config.default_model_filename
    assert triton_plan_file(model_dir, config, "8.9").read_bytes() == plan.read_bytes()
    assert not triton_plan_file(model_dir, config, "9.0").exists()  # another GPU finds nothing to load
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    readme = (model_dir / "README.md").read_text()
    assert f"Built with TensorRT {DOUBLE} on {HOST_GPU} (compute capability 8.9)" in readme
    assert f"TensorRT {DOUBLE} exactly" in readme and "only on GPUs of compute capability 8.9" in readme
    assert "version-compatible=true" not in readme + result.stderr


def test_hardware_compatible_plan_is_the_default_file(trt_double, resnet18_onnx, tmp_path):
    plan = write_plan(tmp_path, resnet18_onnx.path, options={"hardware_compatible": True})
    assert run("triton", plan, "--repo", tmp_path / "repo").exit_code == 0
    model_dir = tmp_path / "repo" / "r18"
    config = _config(model_dir)
    assert config.default_model_filename == "model.plan" and not config.cc_model_filenames
    assert triton_plan_file(model_dir, config, "8.0").is_file() and triton_plan_file(model_dir, config, "9.0").is_file()
    assert "Hardware-compatible (Ampere and newer)" in (model_dir / "README.md").read_text()


def test_version_compatible_plan_says_how_to_start_the_server(trt_double, resnet18_onnx, tmp_path):
    plan = write_plan(tmp_path, resnet18_onnx.path, options={"version_compatible": True})
    result = run("triton", plan, "--repo", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    flag = "--backend-config=tensorrt,version-compatible=true"
    assert "is version-compatible: Triton loads it only when tritonserver runs with " + flag in result.stderr
    readme = (tmp_path / "repo" / "r18" / "README.md").read_text()
    assert f"tritonserver --model-repository=REPO {flag}" in readme and f"TensorRT is {DOUBLE} or a later release" in readme
    assert flag not in (tmp_path / "repo" / "r18" / "config.pbtxt").read_text()  # no config field can carry it


def test_fixed_batch_plan_is_served_without_batching(trt_double, resnet18_onnx, tmp_path):
    from resnet_export.deploy.triton import check_config

    plan = write_plan(tmp_path, resnet18_onnx.path, profile=(4, 4, 4))
    result = run("triton", plan, "--repo", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "repo" / "r18"
    text = (model_dir / "config.pbtxt").read_text()
    config = _config(model_dir)
    assert text.startswith("max_batch_size: 0\n") and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [4, 3, 64, 64] and list(config.output[0].dims) == [-1, 5]
    assert list(config.model_warmup[0].inputs["input"].dims) == [4, 3, 64, 64]
    check_config(text, plan, "r18", 0)
    readme = (model_dir / "README.md").read_text()
    assert "every request carries exactly 4 images" in readme and "* 4)  # the model takes exactly 4" in readme
    assert_one_line_error(run("triton", plan, "--repo", tmp_path / "other", "--max-batch", "4"),
                          "profile is fixed at batch 4: it is served with max_batch_size 0")
    ranged = write_plan(tmp_path, resnet18_onnx.path, profile=(2, 4, 8), name="r2")
    assert_one_line_error(run("triton", ranged, "--repo", tmp_path / "other"),
                          "profile starts at batch 2; Triton's batcher sends batches from 1")


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "32"], "`max-batch` 32 is above the plan's profile maximum 16".replace("`max-batch`", "--max-batch")),
    (["--kind", "cpu"], "a TensorRT plan runs on a GPU instance only"),
    (["--preferred-batch", "32"], "preferred batch size 32 is outside 1..max_batch_size 16"),
    (["--ort-trt"], "--ort-trt is ONNX Runtime's TensorRT accelerator for an ONNX"),
    (["--backend", "openvino"], "a TensorRT plan is served by Triton's tensorrt backend, not openvino"),
])
def test_plan_errors_write_nothing(plan, tmp_path, args, message):
    assert_one_line_error(run("triton", plan, "--repo", tmp_path / "repo", *args), message)
    assert not (tmp_path / "repo").exists()


def test_versions_force_and_bad_artifacts(resnet18_onnx, tmp_path):
    repo = tmp_path / "repo"
    assert run("triton", resnet18_onnx.path, "--repo", repo).exit_code == 0
    config_before = (repo / "resnet18" / "config.pbtxt").read_text()
    assert_one_line_error(run("triton", resnet18_onnx.path, "--repo", repo, "--max-batch", "4"),
                          "resnet18/1 exists: pass --force to replace it")
    assert (repo / "resnet18" / "config.pbtxt").read_text() == config_before
    assert run("triton", resnet18_onnx.path, "--repo", repo, "--version", "2").exit_code == 0
    assert run("triton", resnet18_onnx.path, "--repo", repo, "--max-batch", "4", "--force").exit_code == 0
    assert sorted(p.name for p in (repo / "resnet18").iterdir()) == ["1", "2", "README.md", "config.pbtxt"]
    assert _config(repo / "resnet18").max_batch_size == 4
    assert [p.name for p in repo.iterdir()] == ["resnet18"]  # no staging left behind
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    assert_one_line_error(run("triton", text, "--repo", repo), "expected an .onnx file or a TensorRT .plan")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.triton
@pytest.mark.skipif(shutil.which("tritonserver") is None,
                    reason="no tritonserver binary with the onnxruntime backend on PATH (none installable here)")
def test_live_server_answers_as_onnx_runtime(resnet18_onnx, tmp_path):
    import tritonclient.grpc as grpcclient

    from resnet_export.runtime.runners import OrtRunner

    repo = tmp_path / "repo"
    assert run("triton", resnet18_onnx.path, "--repo", repo, "--kind", "cpu").exit_code == 0
    grpc_port = _free_port()
    server = subprocess.Popen(["tritonserver", f"--model-repository={repo}", f"--grpc-port={grpc_port}",
                               "--http-port=0", "--metrics-port=0", "--grpc-address=127.0.0.1"])
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.time() + 60
        while time.time() < deadline and not _ready(client):
            time.sleep(1)
        batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
        inputs = [grpcclient.InferInput("input", list(batch.shape), "FP32")]
        inputs[0].set_data_from_numpy(batch)
        answer = client.infer("resnet18", inputs).as_numpy("logits")
        np.testing.assert_allclose(answer, OrtRunner(resnet18_onnx.path).infer(batch), rtol=1e-4, atol=1e-4)
    finally:
        server.terminate()
        server.wait(30)


def _ready(client) -> bool:
    try:
        return client.is_model_ready("resnet18")
    except Exception:  # the server is still starting
        return False
