"""What an artifact records of itself (precision, preprocessing, reference, verification) and any artifact
verified against PyTorch (``verify_artifact``)."""

from __future__ import annotations
import json
import logging
import re
from functools import partial
from pathlib import Path
import numpy as np
from ..progress import task
from ..data import ImageFolder, Inputs, image_folder, random_inputs
from ..errors import OnnxError
from ..cpu import cpu_info, describe_cpu
from ..manifest import check_not_input, check_writable_dir, manifest_path, sha256_file, write_json
from ..source.models import LoadedModel
from ..onnx_graph import graph_precision, input_spec, load_onnx, onnx_preprocessing, read_metadata
from ..preprocessing import Preprocessing
from ..runtime.runners import OrtRunner, Runner, TorchRunner
from ..checks.reference_record import PYTORCH, read_record
from ..engine.build import profile_batch_sizes
from ..engine.tensorrt import load_manifest
from ..engine.runner import TrtRunner
from ..checks.verify import GATES, Gate, Verification, plan_gate, verify
from ..checks.on_ray import scorer_on_ray
from ..checks.results import ResultsFile

log = logging.getLogger(__name__)


def _plan_checks(engine: TrtRunner, precision: str, onnx_path: Path, tf32: bool) -> tuple[Gate, list[int]]:
    """A plan's gate (``plan_gate``, by what its ONNX, where it is here, says of the weights) and the batches it is
    verified at: its profile's smallest, tuned and largest."""
    random_weights = Path(onnx_path).is_file() and weights_random(onnx_path)
    sizes = profile_batch_sizes(engine.profile_min_batch, engine.profile_opt_batch, engine.profile_max_batch)
    return plan_gate(precision, random_weights, tf32), sizes


def recorded_reference(onnx_path: str | Path, count: int = 8, seed: int = 0) -> tuple[Inputs, np.ndarray, str]:
    """The inputs and reference logits that stand for ``onnx_path``'s model, and what they are in words.

    The reference the ONNX carries from its own verification (``reference_record``: PyTorch FP32's logits, or
    what stood for PyTorch then); when it carries none, ``count`` seeded random inputs and the ONNX itself on
    ONNX Runtime, said to be a fallback.
    """
    recorded = read_record(onnx_path)
    if recorded is not None:
        return recorded.as_inputs(), recorded.logits, recorded.summary()
    inputs = random_inputs(onnx_preprocessing(onnx_path), count, seed)
    return inputs, OrtRunner(onnx_path).infer(inputs.array), (
        f"{Path(onnx_path).name} on ONNX Runtime on {inputs.description} (the ONNX records no reference: "
        "compared with the ONNX it was built from, not with PyTorch)")


def weights_random(onnx_path: str | Path) -> bool:
    """Whether the ONNX says its model had random weights (its metadata's source); False when it does not say."""
    source = read_metadata(onnx_path).get("source") or {}
    return "weights" in source and source["weights"] is None


def stand_in_label(fp32_onnx: str | Path) -> str:
    """What an FP32 ONNX on ONNX Runtime is, as a reference: how close it came to PyTorch when it was made."""
    recorded = recorded_verification(fp32_onnx) or {}
    error = (recorded.get("metrics") or {}).get("max_rel_err")
    name = Path(fp32_onnx).name
    if recorded.get("passed") and error is not None and "PyTorch" in (recorded.get("reference") or PYTORCH):
        return f"FP32 ONNX {name} (on ONNX Runtime; it matched PyTorch FP32 to a relative error of {error:.1g})"
    return f"FP32 ONNX {name} (on ONNX Runtime)"


def artifact_precision(artifact: str | Path) -> tuple[str, str]:
    """fp32, fp16 or int8, and where it was read: the manifest, the ONNX metadata, or the graph itself
    (Q/DQ nodes: int8; float16 weights: fp16; neither: fp32). A plan needs its manifest."""
    artifact = Path(artifact)
    sidecar = manifest_path(artifact)
    if sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text()).get("precision")
        except ValueError:
            recorded = None
        dtype = recorded.get("dtype") if isinstance(recorded, dict) else recorded
        if dtype in GATES:
            return dtype, "its manifest"
    if artifact.suffix != ".onnx":
        raise OnnxError(f"{artifact} has no manifest ({artifact.name}.json) to tell its precision: pass `precision`")
    recorded = graph_precision(artifact)
    return recorded["dtype"], recorded.get("from", "its metadata")


def artifact_preprocessing(artifact: Path, loaded: LoadedModel) -> Preprocessing:
    """How inputs are made for ``artifact``: its own preprocessing (an ONNX's metadata, a plan's source ONNX),
    else MODEL's when its input size fits the graph, else one derived from the graph's input shape.

    MODEL options that state another preprocessing than the artifact's get a warning; the artifact's wins.
    """
    source = artifact
    if artifact.suffix != ".onnx":
        source = Path((load_manifest(artifact) or {}).get("onnx", ""))
    if not source.is_file() or source.suffix != ".onnx":
        return loaded.preprocessing
    model = load_onnx(source, load_weights=False)
    stored = read_metadata(model).get("preprocessing")
    graph = input_spec(model)
    if stored:
        spec = Preprocessing.from_dict(stored)
    elif (loaded.preprocessing.channels, loaded.preprocessing.input_size) == (graph.channels, graph.input_size):
        spec = loaded.preprocessing
    else:
        spec = graph
    if not spec.same_as(loaded.preprocessing):
        log.warning(f"the model options state another preprocessing ({loaded.preprocessing.describe()}) than "
                    f"{artifact.name} ({spec.describe()}): verifying with the artifact's")
    return spec


def verify_artifact(artifact: str | Path, loaded: LoadedModel | None, *, images: str | Path | None = None,
                    seed: int = 0, precision: str | None = None, backend: str = "ort",
                    results: str | Path | None = None, resume: bool = False, ray_address: str | None = None,
                    workers: int = 2, decoders: int | None = None) -> tuple[str, str, Verification]:
    """Compare an ONNX file or a plan with PyTorch using its precision's gate.

    With ``loaded`` (the PyTorch model) on ``images`` or seeded random inputs, preprocessed as the artifact says
    (``artifact_preprocessing``). Without it, against the reference the artifact (a plan: its ONNX) recorded when
    it was made (``reference_record``). The precision, and so the gate, comes from the artifact
    (``artifact_precision``) unless ``precision`` is given; returns it, where it came from, and the
    verification. A plan runs every batch of its profile (smallest, tuned, largest) and is gated as it was built
    (``plan_gate``). An ONNX runs on ONNX Runtime (``backend`` ort; an INT8 one also exactly, graph optimizations
    off: its fused run on this CPU must match) or compiled by OpenVINO for this CPU (``backend`` openvino).

    ``images`` (a folder) stream through a pool of ``decoders`` threads (``image_stream``), and the per-image results
    to ``results`` (JSON Lines; ``resume`` continues an interrupted run); with ``ray_address`` the batches are
    scored by ``workers`` Ray actors (``checks.on_ray``), with the same figures.
    """
    artifact = Path(artifact)
    if artifact.suffix not in (".onnx", ".plan", ".engine"):
        raise OnnxError(f"{artifact}: expected an .onnx file or a TensorRT .plan")
    if not artifact.is_file():
        raise OnnxError(f"{artifact} not found")
    precision, origin = (precision, "requested") if precision else artifact_precision(artifact)
    recorded = recorded_verification(artifact)
    if recorded and recorded.get("cpu") and _cpu_key(recorded["cpu"]) != _cpu_key(cpu_info()):
        log.warning(f"{artifact.name} was verified on {describe_cpu(recorded['cpu'])} when made; "
                    f"re-checking on this machine, {describe_cpu(cpu_info())}")
    onnx_path = artifact if artifact.suffix == ".onnx" else Path((load_manifest(artifact) or {}).get("onnx", ""))
    if backend not in ("ort", "openvino") or (backend == "openvino" and artifact.suffix != ".onnx"):
        raise OnnxError(f"`backend` {backend} does not verify {artifact.suffix} files: ort or openvino run an ONNX")
    candidate = _candidate(artifact, backend, precision)
    if loaded is None:
        inputs, reference, described = _recorded_reference(artifact, onnx_path, images)
    else:
        spec = artifact_preprocessing(artifact, loaded)
        _check_input_shape(artifact, candidate, spec)
        inputs = image_folder(images, spec, decoders) if images else random_inputs(spec, 8, seed)
        reference, described = TorchRunner(loaded.module), f"{PYTORCH} on {inputs.description}"
    exact = OrtRunner(artifact, exact=True) if isinstance(candidate, OrtRunner) and precision == "int8" else None
    gate, sizes, slack = plan_gate(precision, onnx_path.is_file() and weights_random(onnx_path)), None, 0
    if isinstance(candidate, TrtRunner):  # every batch of the engine's optimization profile, as it was built
        options = (load_manifest(artifact) or {}).get("options", {})
        (gate, sizes), slack = _plan_checks(candidate, precision, onnx_path, options.get("tf32", False)), 1
    streamed = results if images and loaded is not None else None
    if streamed:
        check_not_input([streamed], [artifact, images])
        check_writable_dir(Path(streamed))
        streamed = ResultsFile(streamed, {"artifact": artifact.name, "sha256": sha256_file(artifact),
                                          "reference": described, "backend": backend}, resume)
    scorer = None
    if ray_address:
        if not isinstance(inputs, ImageFolder):
            raise OnnxError("`ray` verifies an image folder against the PyTorch model: give MODEL and `images`")
        make = partial(_runners, loaded.module, artifact, backend, precision, exact is not None)
        scorer = scorer_on_ray(inputs, make, ray_address, workers)
    with task(log, f"Verifying {artifact.name} against {described}"):
        verification = verify(reference, candidate, inputs, gate, getattr(candidate, "fixed_batch", None), sizes,
                              exact=exact, cover=sizes is not None, described_reference=described, slack=slack,
                              results=streamed, scorer=scorer)
    if streamed:  # the summary beside the per-image results, passed or not
        write_json(Path(results).with_suffix(".json"), {"artifact": str(artifact), "precision": precision,
                                                        "images": str(images), "verification": verification.to_dict()})
    verification.raise_if_failed(f"{artifact} failed the {precision.upper()} gate (precision from {origin}; "
                                 f"vs {described})")
    return precision, origin, verification


def _candidate(artifact: Path, backend: str, precision: str) -> Runner:
    """What runs ``artifact`` for ``verify_artifact``: TensorRT for a plan, else ONNX Runtime or OpenVINO."""
    if artifact.suffix != ".onnx":
        return TrtRunner(artifact)
    if backend == "openvino":
        from ..runtime.runners import OpenVinoRunner

        return OpenVinoRunner(artifact, precision, None)
    return OrtRunner(artifact)


def _runners(module, artifact: Path, backend: str, precision: str, exact: bool) -> tuple:
    """The reference, candidate and exact runners of ``verify_artifact``, made where they run (a Ray actor)."""
    return (TorchRunner(module), _candidate(artifact, backend, precision),
            OrtRunner(artifact, exact=True) if exact else None)


def _recorded_reference(artifact: Path, onnx_path: Path, images: str | Path | None):
    """The inputs, reference logits and words an artifact is verified against when no model is given: what its ONNX
    recorded; for a plan whose ONNX recorded nothing, that ONNX on ONNX Runtime (said so)."""
    if images:
        raise OnnxError("`images` need the PyTorch model to compare with: give MODEL too")
    if not onnx_path.is_file():
        raise OnnxError(f"{artifact.name}: its ONNX ({onnx_path or 'not named by a manifest'}) is not here to say "
                        "what it stands for; give the model (--arch/--model and --weights) to compare with PyTorch")
    if onnx_path == artifact and read_record(onnx_path) is None:
        raise OnnxError(f"{artifact.name} records no reference to verify against; give the model "
                        "(--arch/--model and --weights) to compare with PyTorch")
    return recorded_reference(onnx_path)


def _check_input_shape(artifact: Path, candidate, spec: Preprocessing) -> None:
    """A one-line error before anything runs when the preprocessing makes inputs the graph cannot take."""
    expected = tuple(candidate.session.get_inputs()[0].shape[1:]) if isinstance(candidate, OrtRunner) else None
    given = (spec.channels, *spec.input_size)
    if expected and any(isinstance(e, int) and e != g for e, g in zip(expected, given)):
        raise OnnxError(f"{artifact.name} takes inputs of {list(expected)} but its preprocessing makes {list(given)}: "
                        "state it with `resize`/`input_size` as the model was trained")


def _cpu_key(info: dict) -> tuple:
    return info.get("model"), info.get("arch"), tuple(info.get("flags", ()))


def recorded_verification(artifact: str | Path) -> dict | None:
    """The verification the artifact's manifest recorded when it was made (metrics, gate, CPU), if any."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("verification")
    except (OSError, ValueError):
        return None


def recorded_source(artifact: str | Path) -> Path | None:
    """The ONNX a precision ONNX was made from, as its manifest records it, when that file is here and is FP32."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        source = Path((json.loads(path.read_text()).get("source") or {}).get("onnx") or "")
    except (OSError, ValueError):
        return None
    if source.suffix != ".onnx" or not source.is_file():
        return None
    return source if graph_precision(source)["dtype"] == "fp32" else None
