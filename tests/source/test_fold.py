"""BatchNorm folding: PyTorch level on every arch and custom models, ONNX level on foreign exports."""

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch

from resnet_export.errors import OnnxError
from resnet_export.onnx_graph import op_counts
from resnet_export.source.fold import fold_batchnorm, fold_onnx_batchnorm, to_inference_mode
from resnet_export.source.models import ARCHS, load_model
from resnet_export.pipeline import fold_onnx_file
from resnet_export.runtime.runners import OrtRunner

from ..conftest import USER_MODELS, randomize_batchnorm


def _bn_count(module):
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _assert_folds_exactly(model, shape):
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    before = _bn_count(model)
    folded, report = fold_batchnorm(model)
    assert len(report.folded) == before and not report.unfoldable
    assert _bn_count(folded) == 0
    with torch.no_grad():
        expected, actual = model(x), folded(x)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert _bn_count(model) == before  # the original is untouched


#: Archs folded in the quick loop (`-m "not slow"`); the rest in the full run.
QUICK_ARCHS = ("resnet18", "resnet50", "resnext50_32x4d")


@pytest.mark.parametrize("arch", [a if a in QUICK_ARCHS else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_every_arch_folds_every_batchnorm(arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(arch=arch, num_classes=10, input_size=(32, 32)).module
    _assert_folds_exactly(model, (2, 3, 32, 32))


@pytest.mark.parametrize("factory, shape", [("d2l_resnet18", (2, 1, 64, 64)), ("cifar_resnet", (2, 3, 32, 32))])
def test_custom_models_fold(factory, shape):
    _assert_folds_exactly(load_model(model=f"{USER_MODELS}:{factory}").module, shape)


def test_unfoldable_batchnorms_are_listed_not_dropped():
    model = randomize_batchnorm(load_model(model=f"{USER_MODELS}:unfoldable_bn").module).eval()
    folded, report = fold_batchnorm(model)
    assert report.folded == [("conv3", "bn_ok")]
    reasons = dict(report.unfoldable)
    assert set(reasons) == {"bn_after_relu", "bn_shared_input"}
    assert "not a convolution" in reasons["bn_after_relu"]
    assert "also feeds other operations" in reasons["bn_shared_input"]
    assert "NOT folded: bn_after_relu" in report.summary()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.conv(x)


def test_untraceable_model_reports_every_batchnorm():
    _, report = fold_batchnorm(_Untraceable().eval())
    assert report.unfoldable and report.unfoldable[0][0] == "bn"
    assert "not traceable" in report.unfoldable[0][1]


# --------------------------------------------------------------------------- ONNX level


@pytest.fixture(scope="module")
def torchscript_exports(tmp_path_factory):
    """resnet18 exported elsewhere, BatchNormalization kept: inference mode and training mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_batchnorm(load_model(arch="resnet18", num_classes=10).module).eval()
        # Near-dead channels, as trained networks have: where a running variance is far below epsilon, a fold
        # that forgets epsilon scales the channel 10x (on variances near 1 it would hide in the tolerance).
        for bn in (model.bn1, model.layer4[1].bn2):
            bn.running_var[:2] = 1e-7
        folder = tmp_path_factory.mktemp("foreign")
        x = torch.randn(1, 3, 64, 64)
        paths, models = {}, {}
        for name, mode in (("eval", torch.onnx.TrainingMode.PRESERVE), ("train", torch.onnx.TrainingMode.TRAINING)):
            paths[name] = folder / f"{name}.onnx"
            # A copy each: a training-mode export runs forward in train mode and updates the running
            # statistics it then stores, so each file's reference is its own copy, in eval mode.
            models[name] = copy.deepcopy(model)
            torch.onnx.export(models[name], (x,), str(paths[name]), dynamo=False, training=mode,
                              do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
            models[name].eval()
    return models, paths


def test_onnx_fold_of_inference_export(torchscript_exports, tmp_path):
    models, paths = torchscript_exports
    model = models["eval"]
    assert op_counts(onnx.load(str(paths["eval"])))["BatchNormalization"] == 20
    out = tmp_path / "folded.onnx"
    result = fold_onnx_file(paths["eval"], out)
    assert len(result.fold.folded) == 20 and not result.fold.unfoldable
    assert op_counts(onnx.load(str(out)))["BatchNormalization"] == 0
    assert result.verification.passed
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OrtRunner(out).infer(x), expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "folded.onnx.json").is_file()


def test_onnx_fold_of_training_mode_export(torchscript_exports, tmp_path):
    models, paths = torchscript_exports
    model = models["train"]
    proto = onnx.load(str(paths["train"]))
    assert op_counts(proto)["BatchNormalization"] == 20
    assert to_inference_mode(proto) == 20
    report = fold_onnx_batchnorm(proto)
    assert len(report.folded) == 20 and op_counts(proto)["BatchNormalization"] == 0
    out = tmp_path / "folded.onnx"
    result = fold_onnx_file(paths["train"], out)
    assert result.to_inference == 20 and result.verification.passed
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():  # the running statistics are used: same as the eval-mode PyTorch model
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OrtRunner(out).infer(x), expected, rtol=1e-4, atol=1e-4)


def test_onnx_fold_rejects_non_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 definitely not protobuf" * 3)
    with pytest.raises(OnnxError, match="not an ONNX model"):
        fold_onnx_file(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(OnnxError, match="not found"):
        fold_onnx_file(tmp_path / "missing.onnx", tmp_path / "out.onnx")
