"""`make gpu-check` as a GPU image meets it, run here on the CPU: the packages such an image lacks hidden (in this
process and, through tests/gpu_image/sitecustomize.py, in the check's children), a host device with a fixed clock as
its GPU (the device seam), a tiny model. What it shows: `-m gpu` collects without them, the peer script and the
report writer run, the verdict counts its claims, and a planted failure makes it exit non-zero, naming the claim."""

import importlib.util
import json
import os
import sys

import pytest

from resnet_export.runtime import device as devices

from ..conftest import TESTS
from .test_gpu_bench import FIXED, FixedClockDevice

#: What the lent GPU image lacks of what this project installs (benchmarks/gpu_image_packages.txt has what it has).
HIDDEN = "tritonclient,modelopt,tensorrt,openvino,onnxruntime_ep_openvino,ray,nncf,polygraphy,onnx_graphsurgeon"
GPU = "Fixed-clock test GPU"
SMALL = ["--arch", "resnet18", "--input-size", "32", "--batch-sizes", "1,2", "--min-time", "0.05", "--rounds", "1",
         "--warmup", "0", "--backends", "torch,ort-cuda,trt", "--precisions", "fp32,fp16"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", TESTS.parent / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpu_image(monkeypatch):
    """This process and its children without the packages a GPU image lacks."""
    for name in HIDDEN.split(","):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setenv("GPU_IMAGE_HIDES", HIDDEN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS / "gpu_image"),
                                                                   os.environ.get("PYTHONPATH")])))


def test_without_a_gpu_it_refuses_to_claim_anything_unless_dry_run(gpu_image, tmp_path, capsys):
    assert _gpu_check().main(["--out", str(tmp_path), "--no-tests", *SMALL]) == 2
    assert "no CUDA GPU is visible here (--dry-run runs it without one" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.slow
def test_dry_run_on_a_gpu_image_collects_judges_and_fails_for_cause(gpu_image, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(devices, "current", lambda: FixedClockDevice(name=GPU))
    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "clean"), *SMALL]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "clean" / "gpu-fixed-clock-test-gpu" / "report.json").read_text())
    claims = {c["claim"]: c for c in report["gpu_check"]["claims"]}
    tests = claims["pytest -m gpu"]
    assert tests["status"] == "not checked" and "skipped" in tests["detail"] and "(exit 0)" in tests["detail"]
    assert claims["trt fp16 rows"]["status"] == "not checked" and "TensorRT" in claims["trt fp16 rows"]["detail"]
    gates = [c for name, c in claims.items() if "meets its" in name]
    assert len(gates) == 6 and {c["status"] for c in gates} == {"held"}  # fp32: default and strict; fp16; 2 batches
    peer = claims["torch fp32 b1 within 10% of plain PyTorch (fp32)"]
    assert peer["status"] == "not checked" and peer["detail"] == f"the peer ran on cpu, the row on {GPU}"
    assert json.loads((tmp_path / "clean" / "gpu-fixed-clock-test-gpu" / "peer.json").read_text())["rows"]
    held = sum(c["status"] == "held" for c in claims.values())
    assert report["gpu_check"]["verdict"] == f"{sum(c['status'] != 'not checked' for c in claims.values())} of " \
                                             f"{len(claims)} GPU claims checked, {held} held"
    assert report["gpu_check"]["verdict"] in out
    rows = {(r["backend"], r["precision"], r["batch"], r["tf32"]): r for r in report["rows"]}
    assert rows["torch", "fp32", 1, True]["speedup_vs_torch"] == 1.0  # the baseline: PyTorch's default TF32
    assert "TF32 off (strict FP32)" in rows["torch", "fp32", 1, False]["timing"]

    # Planted: a peer that ran on the same GPU twice as fast at b1, and an FP16 forward that answers another input
    peer = {"device": GPU, "clock": "CUDA events", "rows": [
        {"name": "fp32", "method": "eager", "img_s": {"1": 2 / FIXED, "2": 2 / FIXED}, "compile_s": None}]}
    (tmp_path / "peer.json").write_text(json.dumps(peer))
    from resnet_export.runtime.device_runners import TorchDeviceRunner

    forward = TorchDeviceRunner._forward
    monkeypatch.setattr(TorchDeviceRunner, "_forward",
                        lambda self, x: forward(self, x).flip(0) if self.precision == "fp16" else forward(self, x))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "planted"), "--no-tests", "--peer",
                           str(tmp_path / "peer.json"), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "FAILED: torch fp32 b1 within 10% of plain PyTorch (fp32): 250.0 vs 500.0 img/s (0.50x)" in err
    assert "FAILED: torch fp32 b2 within 10% of plain PyTorch (fp32): 500.0 vs 500.0" not in err  # b2 matched
    assert "FAILED: torch fp16 b2 (" in err and "meets its fp16 gate against PyTorch FP32" in err
    assert "input-dependent part" in err  # the rows answer each other's inputs


def test_wheelhouse_pieces_are_joined_and_checked(tmp_path):
    """A wheel split into pieces is joined back exactly; a missing or altered piece is refused by name."""
    sys.path.insert(0, str(TESTS.parent / "benchmarks"))
    import wheelhouse

    folder, joined = tmp_path / "house", tmp_path / "joined"
    folder.mkdir(), joined.mkdir()
    data = os.urandom(2500)
    wheel = folder / "demo-1.0-py3-none-any.whl"
    wheel.write_bytes(data)
    entry = {"name": "demo", "version": "1.0", "file": wheel.name, "sha256": wheelhouse.sha256(wheel),
             "bytes": len(data), "pieces": wheelhouse.split(wheel, 1000)}
    (folder / "manifest.json").write_text(json.dumps({"wheels": [entry]}))
    assert not wheel.exists() and [p["file"] for p in entry["pieces"]] == [f"{wheel.name}.part00{i}" for i in range(3)]
    assert all((folder / p["file"]).stat().st_size <= 1000 for p in entry["pieces"])
    assert wheelhouse.assemble(folder, joined)[0].read_bytes() == data
    piece = folder / entry["pieces"][1]["file"]
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    with pytest.raises(wheelhouse.WheelhouseError, match=r"part001 does not match its sha256"):
        wheelhouse.assemble(folder, joined)
    piece.unlink()
    with pytest.raises(wheelhouse.WheelhouseError, match=r"part001 is missing"):
        wheelhouse.assemble(folder, joined)
