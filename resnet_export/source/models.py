"""Model sources: torchvision ResNet-family archs, checkpoints, users' factories, preprocessing spec.

Everything here ends in a :class:`LoadedModel`: an eval-mode ``nn.Module``, the
:class:`Preprocessing` its inputs need, and a provenance record for the manifests.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pickle
import re
import sys
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ModelError, first_line
from ..manifest import sha256_file
from ..preprocessing import Preprocessing, per_channel, stated

#: The torchvision ResNet-family builders this toolkit supports, by name.
ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
DEFAULT_ARCH = "resnet50"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Resize-then-center-crop ratio of the classic ImageNet evaluation (256 -> 224).
CROP_RATIO = 224 / 256
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
log = logging.getLogger(__name__)

STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
KEY_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedModel:
    """An eval-mode module with its preprocessing and provenance."""

    module: nn.Module
    preprocessing: Preprocessing
    source: dict

    @property
    def name(self) -> str:
        """The arch name or the factory spec."""
        return self.source.get("arch") or self.source["factory"]

    @property
    def stem(self) -> str:
        """A file name for its artifacts: the arch, or the factory function's name (``resnet50``, ``cifar_resnet``)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name.rsplit(":", 1)[-1]).strip("._") or "model"


# --------------------------------------------------------------------------- archs and weights


def check_arch(name: str) -> str:
    """Return ``name`` if it is a supported arch, else raise with the closest names."""
    if name in ARCHS:
        return name
    close = difflib.get_close_matches(name, ARCHS, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; choose one of {', '.join(ARCHS)}"
    raise ModelError(f"unknown arch '{name}'{hint}")


def weights_enum(arch: str):
    """The torchvision weights enum of an arch (e.g. ``ResNet50_Weights``)."""
    import torchvision.models

    return torchvision.models.get_model_weights(arch)


def resolve_torchvision_weights(arch: str, name: str):
    """Map ``IMAGENET1K_V2``, ``ResNet50_Weights.IMAGENET1K_V1`` or ``DEFAULT`` to a weights member."""
    enum = weights_enum(arch)
    enum_name, _, member = name.rpartition(".")
    if enum_name and enum_name != enum.__name__:
        raise ModelError(f"weights '{name}' belong to another arch; {arch} takes {enum.__name__}.*")
    try:
        return enum[member]
    except KeyError:
        known = ", ".join(enum.__members__)
        raise ModelError(
            f"unknown weights '{name}' for {arch}; known: {known}, or a checkpoint file "
            f"({', '.join(CHECKPOINT_SUFFIXES)})"
        ) from None


def torchvision_state_dict(weights) -> dict:
    """Load torchvision weights from the torch hub cache (downloading them if possible), weights_only."""
    from torch.hub import HASH_REGEX, download_url_to_file, get_dir

    filename = weights.url.rsplit("/", 1)[-1]
    cached = Path(get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        found = HASH_REGEX.search(filename)
        try:
            download_url_to_file(weights.url, str(cached), found.group(1) if found else None,
                                 progress=sys.stderr.isatty())
        except OSError as exc:  # URLError and friends: offline, proxy, DNS
            raise ModelError(
                f"weights {weights} are not cached and could not be downloaded ({exc}); "
                f"download {weights.url} and save it as {cached}"
            ) from exc
        except RuntimeError as exc:  # hash mismatch
            raise CheckpointError(f"downloaded {weights.url} does not match its hash ({exc})") from exc
    return load_checkpoint(cached)


def arch_summary(arch: str) -> dict:
    """Parameters, GMACs at 224x224 and known weights names of an arch (built on the meta device)."""
    import torchvision.models

    with torch.device("meta"):
        model = torchvision.models.get_model(arch)
    params = sum(p.numel() for p in model.parameters())
    return {
        "arch": arch,
        "params": params,
        "gmacs": count_macs(model, (1, 3, 224, 224), device="meta") / 1e9,
        "weights": [w for w in weights_enum(arch).__members__ if w != "DEFAULT"],
    }


def count_macs(model: nn.Module, shape: tuple[int, ...], device: str = "cpu") -> int:
    """Multiply-accumulates of one forward pass through the model's convs and linears."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.empty(shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Unwraps ``state_dict``/``model``/``model_state_dict``/``state_dict_ema`` and strips
    ``module.``/``_orig_mod.`` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_line(exc)})") from exc
    else:
        obj = _torch_load_safely(path)
    return _strip_prefixes(_unwrap_state_dict(obj, path))


def _torch_load_safely(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refused to load {path}: it holds objects other than tensors and plain containers{what}, "
                f"which weights_only=True never unpickles; "
                "re-save only the state dict, or convert it to .safetensors"
            ) from exc
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_line(exc)})") from exc
    except Exception as exc:  # the weights-only unpickler raises many types on bad bytes
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_line(exc)})") from exc


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_state_dict(obj, path: Path) -> dict:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in STATE_DICT_WRAPPERS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (top-level keys: {keys}); "
            f"expected tensors, or one of {', '.join(STATE_DICT_WRAPPERS)}"
        )
    raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")


def _strip_prefixes(state: dict) -> dict:
    def strip(key: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in KEY_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        return key

    return {strip(k): v for k, v in state.items()}


def load_state_dict_strictly(model: nn.Module, state: dict, what: str, hint: str) -> None:
    """Load ``state`` into ``model``; on any mismatch raise one line with counts and first keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shaped = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shaped:
        parts = [f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shaped)} wrongly shaped keys"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", shaped)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
        raise CheckpointError(f"{what} does not match the model: {'; '.join(parts)}; {hint}")
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- preprocessing


def default_preprocessing(
    channels: int,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    weights=None,
) -> Preprocessing:
    """Resolve the preprocessing from the weights' transforms, then the user's options, then defaults.

    Without weights: 224x224, shorter side resized by 256/224 first, ImageNet mean/std for 3 channels,
    their averages (0.449, 0.226) for any other channel count.
    """
    resize = None
    interpolation = "bilinear"
    class_names = None
    if weights is not None:
        transforms = weights.transforms()
        crop = transforms.crop_size[0]
        resize = transforms.resize_size[0]
        interpolation = transforms.interpolation.value
        class_names = list(weights.meta.get("categories") or []) or None
        input_size = input_size or (crop, crop)
        resize = round(min(input_size) * resize / crop)
        if channels == 3:
            mean = mean or tuple(transforms.mean)
            std = std or tuple(transforms.std)
    input_size = input_size or (224, 224)
    if resize is None:
        resize = round(min(input_size) / CROP_RATIO)
    if mean is None:
        mean = IMAGENET_MEAN if channels == 3 else (round(sum(IMAGENET_MEAN) / 3, 3),) * channels
    if std is None:
        std = IMAGENET_STD if channels == 3 else (round(sum(IMAGENET_STD) / 3, 3),) * channels
    mean, std = per_channel(mean, channels, "mean"), per_channel(std, channels, "std")
    return Preprocessing(tuple(input_size), resize, mean, std, channels, interpolation, class_names)


# --------------------------------------------------------------------------- model sources


def load_arch(
    arch: str = DEFAULT_ARCH,
    weights: str | None = None,
    num_classes: int | None = None,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build a torchvision ResNet-family arch and load ``weights`` (torchvision name or checkpoint file)."""
    import torchvision.models

    check_arch(arch)
    if in_channels < 1:
        raise ModelError(f"`in_channels` must be positive, got {in_channels}")
    tv_weights = None
    if weights and not _looks_like_file(weights):
        tv_weights = resolve_torchvision_weights(arch, weights)
    if num_classes is None:
        num_classes = len(tv_weights.meta["categories"]) if tv_weights else 1000
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
    source = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels}
    hint = "check `arch`, `num_classes` and `in_channels`"
    if tv_weights is not None:
        load_state_dict_strictly(model, torchvision_state_dict(tv_weights), f"weights {tv_weights}", hint)
        source["weights"] = str(tv_weights)
    elif weights:
        load_state_dict_strictly(model, load_checkpoint(weights), f"checkpoint {weights}", hint)
        source.update(weights=str(weights), weights_sha256=sha256_file(weights))
    else:
        _warn_random(seed)
        source["weights"] = None
    preprocessing = default_preprocessing(in_channels, input_size, mean, std, tv_weights)
    return LoadedModel(model.eval(), preprocessing, source)


def load_factory(
    spec: str,
    weights: str | None = None,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Call a user's factory ``FILE.py:FN`` or ``package.module:FN`` that returns an ``nn.Module``."""
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise ModelError(f"`model` '{spec}' must be FILE.py:FN or package.module:FN")
    module = _import_target(target)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ModelError(f"`model`: {target} has no '{fn_name}'")
    if not callable(fn):
        raise ModelError(f"`model`: {target}:{fn_name} is a {type(fn).__name__}, not callable")
    torch.manual_seed(seed)
    try:
        model = fn()
    except Exception as exc:
        raise ModelError(f"`model`: calling {fn_name}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"`model`: {fn_name}() returned a {type(model).__name__}, not a torch.nn.Module")
    source = {"factory": spec}
    if weights:
        hint = "check that the factory builds the model the checkpoint was saved from"
        load_state_dict_strictly(model, load_checkpoint(weights), f"checkpoint {weights}", hint)
        source.update(weights=str(weights), weights_sha256=sha256_file(weights))
    else:
        _warn_random(seed)
        source["weights"] = None
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ModelError(f"`model`: {fn_name}() returned a model without any Conv2d")
    preprocessing = default_preprocessing(first_conv.in_channels, input_size, mean, std)
    return LoadedModel(model.eval(), preprocessing, source)


def _looks_like_file(weights: str) -> bool:
    return weights.endswith(CHECKPOINT_SUFFIXES) or "/" in weights or Path(weights).is_file()


def _import_target(target: str):
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"`model` file {path} not found")
        module_name = f"_resnet_export_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelError(f"`model`: importing {path} failed: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise ModelError(f"`model`: cannot import {target}: {type(exc).__name__}: {exc}") from exc


def _warn_random(seed: int) -> None:
    log.warning("no `weights` given: using random initialisation (seed %d); its outputs mean nothing as "
                "classes (verification still compares like with like)", seed)


def run_forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``batch`` under ``torch.inference_mode()``; a failure names the innermost module running.

    The plain call is what runs (and what the benchmark times); only after a failure is the call
    repeated with hooks on every module to say where it failed.
    """
    try:
        with torch.inference_mode():
            return model(batch)
    except Exception:  # repeated below with hooks, which raise the error naming the module
        pass
    return _forward_naming_failure(model, batch)


def _forward_naming_failure(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``model(batch)`` with hooks tracking the running module, so a failure says where it happened."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[nn.Module] = []

    def enter(module, _args):
        stack.append(module)

    def leave(module, _args, _output):
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names]
    handles += [m.register_forward_hook(leave) for m in names]
    try:
        with torch.no_grad():
            return model(batch)
    except Exception as exc:
        where = ""
        if stack and stack[-1] is not model:
            where = f" in module '{names[stack[-1]]}' ({type(stack[-1]).__name__})"
        raise ModelError(
            f"the model's forward pass failed{where} on input {list(batch.shape)}: {first_line(exc)}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()


def model_files(loaded: LoadedModel) -> list[str]:
    """The files a loaded model was read from (checkpoint, factory file): inputs no output may overwrite."""
    files = [loaded.source.get("weights")]
    factory = loaded.source.get("factory", "")
    if ":" in factory:
        files.append(factory.rsplit(":", 1)[0])
    return [f for f in files if f and Path(f).is_file()]


def load_model(
    arch: str | None = None,
    model: str | None = None,
    weights: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    seed: int = 0,
    resize: int | None = None,
    interpolation: str | None = None,
) -> LoadedModel:
    """Load a model from ``arch`` (default resnet50) or a user's factory ``model``; see the CLI's MODEL options.

    ``resize`` and ``interpolation`` state the preprocessing as trained (``preprocessing.stated``);
    without them it is the weights' transforms, else the defaults.
    """
    if model:
        if arch or num_classes is not None or in_channels is not None:
            raise ModelError("`arch`, `num_classes` and `in_channels` apply to torchvision archs, not to `model`")
        loaded = load_factory(model, weights, input_size, mean, std, seed)
    else:
        loaded = load_arch(arch or DEFAULT_ARCH, weights, num_classes, in_channels or 3, input_size, mean, std, seed)
    loaded.preprocessing = stated(loaded.preprocessing, resize=resize, interpolation=interpolation)
    return loaded
