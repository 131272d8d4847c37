"""The artifacts a benchmark matrix needs, built by the pipeline or reused: ONNX files per precision and target,
and TensorRT plans per batch, each keyed on everything that defines it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..source.models import LoadedModel

if TYPE_CHECKING:
    from ..engine.build import BatchProfile
    from ..engine.tensorrt import RuntimeInfo


def artifact_key(loaded: LoadedModel, seed: int, opset: int | None = None) -> str:
    """A short hash of everything that defines the exported model.

    Source (arch, weights and their sha256), the factory file's content, the seed (random weights),
    preprocessing (input size) and the opset: a change in any of them never reuses another's ONNX.
    """
    from ..source.export import DEFAULT_OPSET
    from ..manifest import sha256_file
    from ..source.models import model_files

    factory = loaded.source.get("factory", "")
    files = {f: sha256_file(f) for f in model_files(loaded) if factory.startswith(f)}  # weights: sha in source
    parts = [loaded.source, files, seed, loaded.preprocessing.to_dict(), opset or DEFAULT_OPSET]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Artifacts:
    """Builds or reuses the ONNX files and engines a matrix needs, under ``folder``."""

    def __init__(self, loaded: LoadedModel, folder: Path, calibration: np.ndarray, seed: int = 0):
        key = artifact_key(loaded, seed)
        self.folder = folder / f"{loaded.name.replace('/', '_').replace(':', '_')}-{key}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.loaded, self.calibration, self.seed = loaded, calibration, seed
        #: INT8 files carry their calibration data's hash, so other data never reuses them.
        self.calib_key = hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest()[:8]

    def onnx(self, precision: str, target: str) -> Path:
        """The ONNX for ``precision``; INT8 for ``target`` (cpu or trt), FP16/INT8 from the FP32 file.

        Each is made by the pipeline function its command uses, so it is verified and has a manifest;
        one is reused only when its manifest says it passed its gate (with random weights, the pipeline's
        fidelity gate: top-1 agreement and accuracy mean nothing there).
        """
        from ..pipeline import PrecisionRequest, onnx_from_model, precision_from_onnx
        from ..runtime.runners import TorchRunner

        fp32 = self.folder / "fp32.onnx"
        if not passed(fp32):
            onnx_from_model(self.loaded, fp32, seed=self.seed)
        if precision == "fp32":
            return fp32
        path = self.folder / (f"int8-{target}-{self.calib_key}.onnx" if precision == "int8" else "fp16.onnx")
        if not passed(path):
            calib = None
            if precision == "int8":
                calib = self.folder / f"calibration-{self.calib_key}.npy"
                np.save(calib, self.calibration)
            request = PrecisionRequest(precision, calib, target, calib_size=len(self.calibration), seed=self.seed)
            precision_from_onnx(fp32, path, request, reference=TorchRunner(self.loaded.module))
        return path

    def engine(self, precision: str, batch: int, tf32: bool = False) -> tuple[Path, BatchProfile]:
        """The TensorRT plan that benchmarks ``precision`` at ``batch``, built for this TensorRT, GPU and platform,
        and its profile: batches 1 to ``batch``, tuned for ``batch`` (opt), so each row runs kernels chosen
        for its own batch. ``tf32``: FP32 layers may use TF32 (FP32 plans only). It is verified against the
        PyTorch logits its ONNX recorded, with the gate of its precision and weights (``engine_from_onnx``)."""
        from ..pipeline import engine_from_onnx
        from ..engine.build import BatchProfile, BuildOptions
        from ..engine.tensorrt import runtime_info

        running = runtime_info()
        profile = BatchProfile(1, batch, batch)
        tf32 = tf32 and precision == "fp32"
        plan, cache = self.engine_files(precision, profile, running, tf32)
        if not self.reusable(plan, running):
            engine_from_onnx(self.onnx(precision, "trt"), plan, profile=profile,
                             options=BuildOptions(timing_cache=str(cache), tf32=tf32))
        return plan, profile

    def engine_files(self, precision: str, profile: BatchProfile, running: RuntimeInfo,
                     tf32: bool = False) -> tuple[Path, Path]:
        """Where the plan of ``profile`` and the timing cache for ``running`` (``runtime_info()``) live.

        Both are named after the TensorRT version, GPU model, compute capability and platform
        (``engine_key``): a plan or cache from before an upgrade, or from another GPU sharing the
        folder, is never picked up. A plan built with TF32 says so in its name.
        """
        from ..engine.tensorrt import engine_key

        key = engine_key(running)
        suffix = f"-{self.calib_key}" if precision == "int8" else "-tf32" if tf32 else ""
        shape = f"b{profile.min}-{profile.opt}-{profile.max}"
        return self.folder / f"{precision}{suffix}-{shape}-{key}.plan", self.folder / f"timing-{key}.cache"

    @staticmethod
    def reusable(plan: Path, running: RuntimeInfo) -> bool:
        """Whether ``plan`` passed its gate when built and its manifest says it runs on ``running``."""
        from ..engine.tensorrt import incompatibility, load_manifest

        return passed(plan) and incompatibility(load_manifest(plan), running) is None


def passed(artifact: Path) -> bool:
    """Whether ``artifact`` exists and its manifest records a passed verification."""
    from ..pipeline import recorded_verification

    return artifact.is_file() and bool((recorded_verification(artifact) or {}).get("passed"))
