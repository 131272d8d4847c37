"""No command writes over one of its inputs; a killed write's temporary is cleaned by the next (Ctrl-C: test_export)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from resnet_export.manifest import atomic_output

from .test_cli import assert_one_line_error, run


@pytest.fixture
def model(resnet18_onnx, tmp_path):
    """A private copy of the FP32 ONNX and its manifest, with their bytes to compare against."""
    path = tmp_path / "m.onnx"
    path.write_bytes(resnet18_onnx.path.read_bytes())
    (tmp_path / "m.onnx.json").write_bytes(resnet18_onnx.path.with_name("resnet18.onnx.json").read_bytes())
    return path, path.read_bytes(), (tmp_path / "m.onnx.json").read_bytes()


def _unchanged(model):
    path, data, manifest = model
    return path.read_bytes() == data and path.with_name("m.onnx.json").read_bytes() == manifest


@pytest.mark.slow
def test_trt_keeps_its_precision_onnx_apart_from_the_input(model, tmp_path):
    result = run("trt", "--onnx", model[0], "--fp16", "--onnx-only", "-o", tmp_path / "m.plan")
    assert result.exit_code == 0, result.output
    assert _unchanged(model) and (tmp_path / "m.fp16.onnx").is_file()
    assert "FP16; vs FP32 ONNX m.onnx (on ONNX Runtime" in result.stdout  # no PyTorch model with --onnx: says what it used
    manifest = json.loads((tmp_path / "m.fp16.onnx.json").read_text())
    assert manifest["source"]["onnx"] == str(model[0]) and manifest["source"]["reference"] == "ort:m.onnx"


@pytest.mark.parametrize("command", [
    ["quantize", "{m}", "--fp16", "-o", "{m}"],
    ["fold", "{m}", "-o", "{m}"],
    ["fold", "{m}", "-o", "{link}"],  # a hard link to the input is the input
    ["trt", "--onnx", "{fp16}", "--fp16", "--onnx-only", "-o", "{plan}"],  # side file m.fp16.onnx is the input
])
def test_writing_over_an_input_is_a_one_line_error_with_nothing_touched(model, tmp_path, command):
    fp16 = tmp_path / "m.fp16.onnx"
    fp16.write_bytes(model[1])
    os.link(model[0], tmp_path / "link.onnx")
    names = {"m": model[0], "link": tmp_path / "link.onnx", "fp16": fp16, "plan": tmp_path / "m.plan"}
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(*[part.format(**names) for part in command])
    assert_one_line_error(result, "would overwrite the input")
    assert _unchanged(model) and fp16.read_bytes() == model[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_killed_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "out.onnx"
    code = ("import os, signal\nfrom resnet_export.manifest import atomic_output\n"
            f"with atomic_output({str(target)!r}) as tmp:\n"
            "    tmp.write_bytes(b'x' * 4096)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code])
    assert killed.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".out.onnx.*.tmp")
    live = tmp_path / f".out.onnx.{os.getpid()}.abc.tmp"  # a write still running in this process
    live.write_bytes(b"")
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and not stale.exists() and live.exists()
