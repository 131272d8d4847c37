"""Shared fixtures: real images, small real models with trained-looking BatchNorm statistics."""

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_export.source.models import LoadedModel, load_model

TESTS = Path(__file__).parent
IMAGES = TESTS / "data" / "images"
USER_MODELS = TESTS / "user_models.py"
SMALL = (64, 64)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model


def loaded(**kwargs) -> LoadedModel:
    """load_model with trained-looking BatchNorm statistics."""
    model = load_model(**kwargs)
    randomize_batchnorm(model.module)
    return model


@pytest.fixture(scope="session")
def images() -> Path:
    return IMAGES


@pytest.fixture(scope="session")
def resnet18_small() -> LoadedModel:
    """resnet18 at 64x64 with 5 classes, one per folder of the test images (so accuracy is measured)."""
    return loaded(arch="resnet18", num_classes=5, input_size=SMALL)


@pytest.fixture(scope="session")
def resnet18_onnx(tmp_path_factory, resnet18_small):
    """A verified resnet18 FP32 ONNX at 64x64, exported once for the session."""
    from resnet_export.pipeline import onnx_from_model

    path = tmp_path_factory.mktemp("resnet18") / "resnet18.onnx"
    return onnx_from_model(resnet18_small, path, images=IMAGES)


@pytest.fixture(scope="session")
def resnet18_b4_onnx(tmp_path_factory, resnet18_small):
    """The session's resnet18 exported at a fixed batch of 4 as ``b4.onnx``, verified, once for the session."""
    from resnet_export.pipeline import onnx_from_model

    return onnx_from_model(resnet18_small, tmp_path_factory.mktemp("resnet18-b4") / "b4.onnx", batch=4, images=IMAGES)


@pytest.fixture(scope="session")
def resnet18_cpu_int8(resnet18_onnx, tmp_path_factory):
    """The session's resnet18 as a CPU-target INT8 (4 calibration images; random weights, so the gate keeps its
    fidelity part alone), built once; a test that edits it works on a copy."""
    from resnet_export.pipeline import PrecisionRequest, precision_from_onnx

    return precision_from_onnx(resnet18_onnx.path, tmp_path_factory.mktemp("cpu-int8") / "q.onnx",
                               PrecisionRequest("int8", IMAGES, "cpu", calib_size=4, min_agreement=0.0,
                                                max_accuracy_drop=100)).path


@pytest.fixture(scope="session")
def digit_images(tmp_path_factory):
    """The digits as PNG files: (root, train folder, val folder)."""
    from .digits import write_digit_images

    root = tmp_path_factory.mktemp("digits")
    return (root, *write_digit_images(root))


def _trained_digits_model(digit_images, source: dict, name: str):
    """Train ``load_model(**source)`` on the digits, export its verified FP32 ONNX, all under ``root/name``."""
    from types import SimpleNamespace

    from resnet_export.pipeline import onnx_from_model

    from .digits import train_digits

    images, train, val = digit_images
    root = images / name
    root.mkdir()
    checkpoint = root / f"{name}.pth"
    train_digits(train, checkpoint, source=source)
    model = load_model(**source, weights=str(checkpoint))
    fp32 = onnx_from_model(model, root / "fp32.onnx", images=val).path
    return SimpleNamespace(root=root, train=train, val=val, checkpoint=checkpoint, model=model, fp32=fp32)


@pytest.fixture(scope="session")
def digits(digit_images):
    """A trained digits ResNet, its image folders and its verified FP32 ONNX (see tests/digits.py)."""
    from .digits import DIGITS_RESNET

    return _trained_digits_model(digit_images, DIGITS_RESNET, "digits_resnet")


@pytest.fixture(scope="session")
def digits_cpu_int8(digits):
    """The trained digits ResNet's CPU-target INT8 (portable form, 256 calibration images, verified against PyTorch
    on the held-out quarter), built once for the session; a test that edits it works on a copy."""
    from resnet_export.pipeline import PrecisionRequest, precision_from_onnx
    from resnet_export.runtime.runners import TorchRunner

    return precision_from_onnx(digits.fp32, digits.root / "int8_cpu.onnx",
                               PrecisionRequest("int8", digits.train, "cpu", calib_size=256, val=digits.val),
                               reference=TorchRunner(digits.model.module))


def copy_artifact(artifact: Path, folder: Path) -> Path:
    """``artifact`` and its manifest copied into ``folder`` (for a test that edits them)."""
    import shutil

    copy = folder / artifact.name
    shutil.copyfile(artifact, copy)
    shutil.copyfile(artifact.with_name(artifact.name + ".json"), copy.with_name(copy.name + ".json"))
    return copy


@pytest.fixture(scope="session")
def digits_r18(digit_images):
    """torchvision's ResNet-18 (1 channel, 10 classes) trained on the digits, with its FP32 ONNX."""
    from .digits import RESNET18

    return _trained_digits_model(digit_images, RESNET18, "resnet18")


@contextmanager
def double_installed(patch: pytest.MonkeyPatch):
    """The TensorRT double on host memory (tests/trt_double) in place of TensorRT and CUDA, set with ``patch``; on
    leaving, the toolkit's TensorRT logger (made for the double) is dropped."""
    from resnet_export.engine import tensorrt as trt

    from .trt_double import install

    try:
        yield install(patch)
    finally:
        trt.logger.cache_clear()


@pytest.fixture
def trt_double(monkeypatch):
    """The TensorRT double in place of TensorRT and CUDA, for this test.

    What runs on it is the toolkit's own TensorRT glue; no figure from it is a TensorRT figure."""
    with double_installed(monkeypatch) as double:
        yield double
