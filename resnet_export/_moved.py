"""The modules' paths before the package was laid out by stage (0.2): each old path still imports, for one
release, as the module it became, with a DeprecationWarning naming the new path.

The old name is an alias, not a copy: ``import resnet_export.verify`` gives the very module
``resnet_export.checks.verify``, so what is set on one is set on the other.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Old module (under ``resnet_export.``) -> where it lives now.
MOVED = {
    "baseline": "bench.baseline",
    "bench_artifacts": "bench.artifacts",
    "bench_report": "bench.report",
    "describe": "deploy.describe",
    "device": "runtime.device",
    "device_runners": "runtime.device_runners",
    "export": "source.export",
    "fold": "source.fold",
    "inference": "deploy.inference",
    "models": "source.models",
    "ort_fixes": "runtime.ort_fixes",
    "precision": "quantize.precision",
    "predict": "deploy.predict",
    "predict_ray": "deploy.predict_ray",
    "reference_record": "checks.reference_record",
    "runners": "runtime.runners",
    "sensitivity": "quantize.sensitivity",
    "serving": "checks.serving",
    "triton": "deploy.triton",
    "trt": "engine",
    "verify": "checks.verify",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new
        self.spec = None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=4)
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        """The module is the new one, already run: give it back its own spec, which the import system overwrote."""
        module.__spec__ = self.spec


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix("resnet_export.")
        if old == fullname or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(f"resnet_export.{MOVED[old]}"))


def install() -> None:
    """Let the old paths import (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())  # before the path finders: an old file left behind never wins
