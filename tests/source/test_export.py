"""FP32 ONNX export and its verification against PyTorch."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from resnet_export.errors import GateFailed, OnnxError
from resnet_export.source.export import export_onnx
from resnet_export.onnx_graph import op_counts, read_metadata
from resnet_export.manifest import atomic_output
from resnet_export.source.models import LoadedModel, default_preprocessing
from resnet_export.pipeline import onnx_from_model
from resnet_export.runtime.runners import OrtRunner, TorchRunner
from resnet_export.checks.verify import GATES, compare, gate_failures
from resnet_export.runtime.batches import batch_plan

from ..conftest import IMAGES, USER_MODELS, loaded


def _assert_deployable(path, batch="batch"):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 19
    assert op_counts(model)["BatchNormalization"] == 0
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert (dim.dim_param or dim.dim_value) == batch
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files
    return model


def test_resnet18_export_is_verified_on_real_images(resnet18_onnx, resnet18_small):
    path = resnet18_onnx.path
    _assert_deployable(path)
    meta = read_metadata(path)
    assert meta["preprocessing"] == json.loads(json.dumps(resnet18_small.preprocessing.to_dict()))
    assert meta["source"]["arch"] == "resnet18"
    assert resnet18_onnx.fold.folded and not resnet18_onnx.fold.unfoldable
    v = resnet18_onnx.verification
    assert v.passed and v.batch_sizes == [1, 5]
    assert v.metrics["samples"] == 6 and "accuracy_candidate" in v.metrics
    assert v.metrics["top1_agreement"] == 1.0 and v.metrics["min_cosine"] >= 0.99999
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    assert manifest["verification"]["passed"] and manifest["fold"]["folded"] == 20
    assert manifest["sha256"] and manifest["settings"]["opset"] == 20


def test_dynamic_batch_runs_any_size(resnet18_onnx, resnet18_small):
    runner, reference = OrtRunner(resnet18_onnx.path), TorchRunner(resnet18_small.module)
    x = np.random.default_rng(3).standard_normal((3, 3, 64, 64), dtype=np.float32)
    assert runner.fixed_batch is None and runner.infer(x).shape == (3, 5)
    np.testing.assert_allclose(runner.infer(x), reference.infer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resnet50_export_verifies(tmp_path):
    result = onnx_from_model(loaded(arch="resnet50", input_size=(64, 64)), tmp_path / "r50.onnx")
    _assert_deployable(result.path)
    assert len(result.fold.folded) == 53 and result.verification.passed


@pytest.mark.parametrize("factory, size", [("d2l_resnet18", (96, 96)), ("cifar_resnet", (32, 32))])
@pytest.mark.slow
def test_custom_models_export_and_verify(tmp_path, factory, size):
    model = loaded(model=f"{USER_MODELS}:{factory}", input_size=size)
    result = onnx_from_model(model, tmp_path / "m.onnx", images=IMAGES)
    _assert_deployable(result.path)
    assert result.verification.passed and not result.fold.unfoldable
    assert "accuracy_candidate" not in result.verification.metrics  # 10 classes, 5 folders: no labels


def test_fixed_batch(resnet18_b4_onnx):
    result = resnet18_b4_onnx
    _assert_deployable(result.path, batch=4)
    assert result.verification.batch_sizes == [4, 4] and result.verification.metrics["samples"] == 6


def test_unfoldable_batchnorm_is_folded_in_onnx_or_listed(tmp_path):
    result = onnx_from_model(loaded(model=f"{USER_MODELS}:unfoldable_bn", input_size=(16, 16)), tmp_path / "u.onnx")
    assert {name for name, _ in result.fold.unfoldable} == {"bn_after_relu", "bn_shared_input"}
    remaining = op_counts(onnx.load(str(result.path)))["BatchNormalization"]
    assert remaining == len(result.onnx_fold.unfoldable)  # whatever is left is reported
    assert result.verification.passed


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.mean((2, 3)) if y.sum() > 0 else y.amax((2, 3))


def test_failed_export_leaves_nothing(tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(OnnxError, match="ONNX export failed.*GuardOnDataDependentSymNode"):
        export_onnx(_DataDependent().eval(), default_preprocessing(3, (16, 16)), out, {})
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_cleans_up_on_error(tmp_path):
    out = tmp_path / "a.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


class _ExportDiffers(nn.Module):
    """Eager and exported graphs differ on purpose: the export reverses the class order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)

    def forward(self, x):
        logits = self.conv(x).mean((2, 3))
        return logits.flip(1) if torch.onnx.is_in_onnx_export() else logits


def test_gate_failure_keeps_artifact_and_records_it(tmp_path):
    model = LoadedModel(_ExportDiffers().eval(), default_preprocessing(3, (16, 16)), {"factory": "differs"})
    out = tmp_path / "s.onnx"
    with pytest.raises(GateFailed, match="failed the FP32 gate: top-1 agreement"):
        onnx_from_model(model, out)
    manifest = json.loads((tmp_path / "s.onnx.json").read_text())
    assert out.is_file() and manifest["verification"]["passed"] is False
    assert manifest["verification"]["failures"][0].startswith("top-1 agreement")


def test_compare_metrics_and_gates():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    same = compare(ref, ref, labels=np.array([0, 2]))
    assert same["top1_agreement"] == 1 and same["max_abs_err"] == 0 and same["kl_divergence"] == pytest.approx(0)
    assert same["accuracy_reference"] == 0.5 and same["accuracy_drop_points"] == 0
    swapped = compare(ref, ref[:, [1, 0, 2]])
    assert swapped["top1_agreement"] == 0 and swapped["min_cosine"] < 0.9
    assert gate_failures(swapped, GATES["fp32"])[0].startswith("top-1 agreement 0.00% < 100.00%")
    assert not gate_failures(same, GATES["int8"])


@pytest.mark.parametrize("count, fixed, expected", [(1, None, [1]), (2, None, [2]), (6, None, [1, 5]),
                                                    (10, None, [1, 8, 2]), (12, None, [1, 8, 3]), (6, 4, [4, 4])])
def test_batch_plan(count, fixed, expected):
    assert batch_plan(count, fixed) == expected


@pytest.mark.parametrize("count, low, high, expected", [(8, 4, 4, [4, 4]), (10, 4, 4, [4, 4, 4]), (10, 2, 8, [2, 8]),
                                                        (12, 4, 8, [4, 8]), (13, 4, 8, [4, 8, 4]), (1, 1, 32, [1])])
def test_batch_plan_stays_inside_an_engine_profile(count, low, high, expected):
    sizes = batch_plan(count, None, max_batch=high, min_batch=low)
    assert sizes == expected and all(low <= size <= high for size in sizes)


def test_image_labels_follow_class_names_numbers_or_order(tmp_path, resnet18_small):
    from PIL import Image

    from resnet_export.data import image_inputs

    for name in ("tabby", "goldfish", "7"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / name / "a.png")
    spec = default_preprocessing(3, (32, 32))
    spec.class_names = ["tench", "goldfish", "tabby", "7"]
    by_name = image_inputs(tmp_path, spec)
    assert list(by_name.labels) == [3, 1, 2] and not by_name.labels_by_order
    spec.class_names = None
    by_order = image_inputs(tmp_path, spec)
    assert by_order.labels_by_order and by_order.labels_for(3) is not None and by_order.labels_for(1000) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA provider may really load")
def test_no_silent_fallback_to_the_cpu_provider(resnet18_onnx):
    with pytest.raises(OnnxError, match="could not use CUDAExecutionProvider .*fell back to CPUExecutionProvider"):
        OrtRunner(resnet18_onnx.path, providers=["CUDAExecutionProvider"])


def test_the_manifest_records_the_opset_the_exporter_wrote_not_the_one_asked_for(tmp_path, monkeypatch):
    """An exporter that writes another opset than it was asked for (a seam: the real exporter, given 19 where the
    pipeline asks 20): the manifest says what the file holds."""
    from resnet_export.pipeline import fp32_onnx as pipeline

    monkeypatch.setattr(pipeline, "export_onnx", lambda *args: export_onnx(*args[:4], 19, *args[5:]))
    result = onnx_from_model(loaded(model=f"{USER_MODELS}:cifar_resnet", input_size=(16, 16)), tmp_path / "c.onnx",
                             opset=20, run_verification=False)
    assert json.loads(result.path.with_name("c.onnx.json").read_text())["settings"]["opset"] == 19


def test_the_manifest_records_the_opset_the_file_declares(resnet18_onnx):
    """Read back from the written file (onnx's own loader), not from what was asked for."""
    import json

    declared = max(o.version for o in onnx.load(str(resnet18_onnx.path)).opset_import if o.domain in ("", "ai.onnx"))
    manifest = json.loads(resnet18_onnx.path.with_name(resnet18_onnx.path.name + ".json").read_text())
    assert manifest["settings"]["opset"] == declared == 20
