"""Model sources: archs, torchvision weights, checkpoints, factories, preprocessing."""


import logging
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from resnet_export.errors import CheckpointError, ModelError
from resnet_export.source.models import (
    ARCHS,
    arch_summary,
    check_arch,
    default_preprocessing,
    load_checkpoint,
    load_model,
    run_forward,
)

from ..conftest import USER_MODELS


def test_archs_are_every_torchvision_resnet_builder():
    tv = {name for name in torchvision.models.list_models(module=torchvision.models) if "res" in name}
    assert set(ARCHS) == tv


def test_arch_summary_matches_torchvision_metadata():
    info = arch_summary("resnet50")
    meta = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta
    assert info["params"] == meta["num_params"]
    assert info["gmacs"] == pytest.approx(meta["_ops"], rel=0.01)
    assert info["weights"] == ["IMAGENET1K_V1", "IMAGENET1K_V2"]


def test_unknown_arch_suggests_closest():
    with pytest.raises(ModelError, match="did you mean resnet50"):
        check_arch("resnet05")


def test_random_init_warns_and_is_seeded(caplog):
    with caplog.at_level(logging.WARNING, logger="resnet_export"):
        a = load_model(arch="resnet18", num_classes=3)
    (record,) = [r for r in caplog.records if r.name == "resnet_export.source.models"]
    assert record.levelno == logging.WARNING and "random initialisation" in record.getMessage()
    b = load_model(arch="resnet18", num_classes=3)
    assert torch.equal(a.module.fc.weight, b.module.fc.weight)
    assert not a.module.training


def test_in_channels_replaces_the_stem():
    model = load_model(arch="resnet18", in_channels=1, num_classes=10, input_size=(96, 96))
    assert model.module.conv1.in_channels == 1
    assert model.preprocessing.channels == 1 and len(model.preprocessing.mean) == 1
    assert run_forward(model.module, torch.zeros(2, 1, 96, 96)).shape == (2, 10)


def test_preprocessing_from_torchvision_weights():
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    spec = default_preprocessing(3, weights=weights)
    assert spec.input_size == (224, 224) and spec.resize == 232
    assert spec.class_names[0] == "tench" and len(spec.class_names) == 1000
    smaller = default_preprocessing(3, input_size=(112, 112), weights=weights)
    assert smaller.resize == 116


def test_uncached_torchvision_weights_name_the_file(monkeypatch, tmp_path):
    def offline(url, dst, *args, **kwargs):  # the download fails, whatever the machine's network
        raise urllib.error.URLError("no route to host")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError) as err:
        load_model(arch="resnet18", weights="IMAGENET1K_V1")
    assert "resnet18-f37072fd.pth" in str(err.value) and str(tmp_path) in str(err.value)


def test_cached_torchvision_weights_load(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18()
    cached = tmp_path / "hub" / "checkpoints"
    cached.mkdir(parents=True)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.save(reference.state_dict(), cached / weights.url.rsplit("/", 1)[-1])
    model = load_model(arch="resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(model.module.fc.weight, reference.fc.weight)
    assert model.source["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert model.preprocessing.class_names[1] == "goldfish"


def test_weights_name_of_another_arch():
    with pytest.raises(ModelError, match="ResNet18_Weights"):
        load_model(arch="resnet18", weights="ResNet50_Weights.IMAGENET1K_V1")


@pytest.fixture(scope="module")
def resnet18_4() -> torch.nn.Module:
    """A randomly initialised resnet18 with 4 classes, the source of the checkpoint tests (read, never changed)."""
    return load_model(arch="resnet18", num_classes=4).module


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.module."])
def test_checkpoint_wrappers_and_prefixes(tmp_path, resnet18_4, wrapper, prefix):
    source = resnet18_4
    state = {prefix + k: v for k, v in source.state_dict().items()}
    payload = {wrapper: state, "epoch": 3} if wrapper else state
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    model = load_model(arch="resnet18", num_classes=4, weights=str(path), seed=1)
    assert torch.equal(model.module.fc.weight, source.fc.weight)
    assert model.source["weights_sha256"]


def test_safetensors_checkpoint(tmp_path, resnet18_4):
    source = resnet18_4
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = load_model(arch="resnet18", num_classes=4, weights=str(path), seed=1)
    assert torch.equal(model.module.conv1.weight, source.conv1.weight)


def test_checkpoint_of_other_class_count_lists_keys(tmp_path, resnet18_4):
    path = tmp_path / "c.pth"
    torch.save(resnet18_4.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_model(arch="resnet18", num_classes=10, weights=str(path))
    message = str(err.value)
    assert "0 missing, 0 unexpected, 2 wrongly shaped" in message
    assert "fc.weight (checkpoint [4, 512], model [10, 512])" in message
    assert "\n" not in message


def test_checkpoint_of_other_arch_lists_keys(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(load_model(arch="resnet18").module.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"\d+ missing, \d+ unexpected, \d+ wrongly shaped keys; missing: layer1.0.conv3.weight"):
        load_model(arch="resnet50", weights=str(path))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "t.pth"
    torch.save(load_model(arch="resnet18", num_classes=2).module.state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_garbage_checkpoint(tmp_path, suffix):
    path = tmp_path / f"g{suffix}"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"refused to load .*\(io.open\)"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: full unpickling runs it
    assert marker.exists()


def test_factory_models_load_with_their_channels():
    model = load_model(model=f"{USER_MODELS}:d2l_resnet18", input_size=(96, 96))
    assert model.preprocessing.channels == 1
    assert model.source == {"factory": f"{USER_MODELS}:d2l_resnet18", "weights": None}
    assert run_forward(model.module, torch.zeros(2, 1, 96, 96)).shape == (2, 10)


def test_factory_from_a_package_module(monkeypatch):
    monkeypatch.syspath_prepend(str(USER_MODELS.parent))
    model = load_model(model="user_models:cifar_resnet", input_size=(32, 32))
    assert model.preprocessing.input_size == (32, 32)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing_file.py:fn", "not found"),
        (f"{USER_MODELS}:nope", "has no 'nope'"),
        (f"{USER_MODELS}:not_callable", "is a int, not callable"),
        (f"{USER_MODELS}:returns_dict", "returned a dict, not a torch.nn.Module"),
        (f"{USER_MODELS}:raises", "factory exploded"),
        ("no_colon", "must be FILE.py:FN"),
        ("no_such_package.mod:fn", "cannot import"),
    ],
)
def test_factory_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        load_model(model=spec)


def test_arch_options_with_model_are_refused():
    with pytest.raises(ModelError, match="not to `model`"):
        load_model(model=f"{USER_MODELS}:cifar_resnet", num_classes=3)


def test_forward_failure_names_the_module():
    model = load_model(model=f"{USER_MODELS}:broken_resnet", input_size=(16, 16))
    with pytest.raises(ModelError, match=r"in module '1' \(BrokenResidual\).*size of tensor"):
        run_forward(model.module, torch.zeros(1, 3, 16, 16))


def test_mean_std_must_match_channels():
    with pytest.raises(ModelError, match="`mean` has 2 values"):
        load_model(arch="resnet18", mean=(0.5, 0.5))
