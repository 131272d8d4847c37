"""Preprocessing a user states (--resize, --interpolation, --mean, --std), honoured by every command."""

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from resnet_export.image_stream import load_image
from resnet_export.errors import EXIT_GATE_FAILED
from resnet_export.source.models import load_model
from resnet_export.onnx_graph import META_PREFIX, onnx_preprocessing
from resnet_export.preprocessing import Preprocessing, stated

from .digits import FACTORY
from .test_cli import assert_one_line_error, run

DIGITS_MODEL = ["--model", FACTORY, "--input-size", "32", "--mean", "0.5", "--std", "0.5"]


def test_resize_to_the_input_size_uses_images_as_they_are(tmp_path):
    out = tmp_path / "d.onnx"
    result = run("onnx", *DIGITS_MODEL, "--resize", "32", "--no-verify", "-o", out)
    assert result.exit_code == 0, result.output
    assert "preprocessing: shorter side to 32 (bilinear), center crop 32x32" in result.stdout
    spec = onnx_preprocessing(out)
    assert spec.resize == 32 and json.loads((tmp_path / "d.onnx.json").read_text())["preprocessing"]["resize"] == 32
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "digit.png")
    expected = (pixels.astype(np.float32) / 255 - 0.5) / 0.5  # the image's own pixels, normalized
    np.testing.assert_allclose(load_image(tmp_path / "digit.png", spec)[0], expected, atol=1e-6)
    default = load_model(model=FACTORY, input_size=(32, 32)).preprocessing
    assert default.resize == 37  # without --resize: the ImageNet 256/224 zoom, which this model never saw
    assert not np.allclose(load_image(tmp_path / "digit.png", default)[0] * default.std[0] + default.mean[0],
                           pixels / 255, atol=1e-3)


def test_interpolation_reaches_the_resize(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "big.png")
    base = Preprocessing((32, 32), 32, (0.0,), (1.0,), 1)
    nearest = stated(base, interpolation="nearest")
    resized = np.asarray(Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST), np.float32) / 255
    np.testing.assert_allclose(load_image(tmp_path / "big.png", nearest)[0], resized, atol=1e-6)
    assert not np.allclose(load_image(tmp_path / "big.png", base)[0], resized, atol=1e-3)  # bilinear differs
    result = run("onnx", *DIGITS_MODEL, "--interpolation", "nearest", "--no-verify", "-o", tmp_path / "n.onnx")
    assert result.exit_code == 0 and onnx_preprocessing(tmp_path / "n.onnx").interpolation == "nearest"
    assert_one_line_error(run("onnx", *DIGITS_MODEL, "--resize", "20", "--no-verify", "-o", tmp_path / "x.onnx"),
                          "--resize 20 is below the input size 32x32")


def test_a_foreign_onnx_gets_its_preprocessing_from_the_options(tmp_path):
    model = load_model(model=FACTORY).module.eval()
    foreign = tmp_path / "foreign.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 1, 32, 32),), str(foreign), dynamo=False,
                          dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
    folded = tmp_path / "folded.onnx"
    result = run("fold", foreign, "--resize", "32", "--interpolation", "nearest", "--mean", "0.5", "--std", "0.25",
                 "-o", folded)
    assert result.exit_code == 0, result.output
    assert "preprocessing: shorter side to 32 (nearest), center crop 32x32, [0, 1], mean 0.5, std 0.25" in result.stdout
    spec = onnx_preprocessing(folded)
    assert (spec.resize, spec.interpolation, spec.mean, spec.std, spec.channels) == (32, "nearest", (0.5,), (0.25,), 1)
    assert json.loads((tmp_path / "folded.onnx.json").read_text())["preprocessing"]["std"] == [0.25]
    fp16 = run("quantize", foreign, "--fp16", "--interpolation", "bicubic", "-o", tmp_path / "h.onnx")
    assert fp16.exit_code == 0, fp16.output
    assert onnx_preprocessing(tmp_path / "h.onnx").interpolation == "bicubic"  # stored for later stages
    assert_one_line_error(run("quantize", folded, "--fp16", "--resize", "40", "-o", tmp_path / "x.onnx"),
                          "carries its preprocessing")


@pytest.mark.slow
def test_quantize_calibrates_on_images_normalised_as_stated(tmp_path):
    """quantize --int8 --mean --std on an ONNX made elsewhere: calibration images are normalised as stated, so
    halving --std doubles the range of the input, and the scale of its QuantizeLinear (minmax) doubles."""
    from .conftest import IMAGES

    foreign = tmp_path / "foreign.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(load_model(model=FACTORY).module.eval(), (torch.randn(2, 1, 32, 32),), str(foreign),
                          dynamo=False, dynamic_axes={"input": {0: "batch"}}, input_names=["input"])

    def input_scale(std):
        out = tmp_path / f"q-{std}.onnx"
        result = run("quantize", foreign, "--int8", "--target", "cpu", "--calib", IMAGES, "--calib-size", "4",
                     "--min-agreement", "0", "--max-accuracy-drop", "100", "--resize", "32", "--mean", "0.5",
                     "--std", std, "-o", out)
        assert result.exit_code == 0, result.output
        model = onnx.load(str(out))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        first = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        return float(inits[first.input[1]])

    assert input_scale(0.25) == pytest.approx(2 * input_scale(0.5), rel=1e-5)


@pytest.mark.slow
def test_verify_takes_preprocessing_and_gate_from_the_artifact(digits, digits_cpu_int8, tmp_path):
    """A 32x32 INT8 artifact verified with only --model and --weights (the options would say 224x224):
    the artifact's preprocessing and the INT8 gate, from its manifest, its metadata, or its graph."""
    from .conftest import copy_artifact

    int8 = copy_artifact(digits_cpu_int8.path, tmp_path)
    bare = ["--model", FACTORY, "--weights", str(digits.checkpoint)]
    with_manifest = run("verify", int8, *bare, "--images", digits.val)
    assert with_manifest.exit_code == 0, with_manifest.output
    assert "INT8 (from its manifest)" in with_manifest.stdout and "on 449 images" in with_manifest.stdout
    assert "verifying with the artifact's" in with_manifest.stderr  # MODEL's default (224) is not the artifact's
    int8.with_name(int8.name + ".json").unlink()
    assert "INT8 (from its metadata)" in run("verify", int8, *bare, "--images", digits.val).stdout
    model = onnx.load(str(int8))
    kept = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    foreign = tmp_path / "foreign-int8.onnx"
    onnx.save(model, str(foreign))
    from_graph = run("verify", foreign, *bare, "--input-size", "32", "--images", digits.val)
    assert from_graph.exit_code == 0, from_graph.output
    assert "INT8 (from its graph (Q/DQ nodes))" in from_graph.stdout
    wrong = run("verify", foreign, "--model", FACTORY, "--weights", str(digits.checkpoint), "--images", digits.val,
                "--precision", "fp32")
    assert wrong.exit_code == EXIT_GATE_FAILED and "Error: internal error" not in wrong.stderr
