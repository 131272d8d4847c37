"""What a new user meets first: the card's commands as typed (outputs named in the current directory), inputs checked
before work, the trt hand-off message where there is no TensorRT, served = verified, one image to predict, and the
README's default path run exactly as written."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from resnet_export.checks.verify import KERNEL_GATE, RANDOM_WEIGHT_PLAN_GATES, compare, gate_failures

from .conftest import IMAGES, USER_MODELS
from .test_cli import assert_one_line_error, run

TINY = ["--model", f"{USER_MODELS}:cifar_resnet", "--input-size", "32", "--resize", "32"]


def test_trt_without_tensorrt_says_what_is_missing_what_passed_and_how_to_finish(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on every machine without TensorRT
    result = run("trt", *TINY, "--fp16")
    assert_one_line_error(result, "cannot build cifar_resnet.fp16.plan here: TensorRT is not installed", code=4)
    line = result.stderr.strip().splitlines()[-1]
    assert "pip install tensorrt-cu13 (CUDA 13 driver) or tensorrt-cu12" in line and "resnet-export[" not in line
    assert "cifar_resnet.fp16.onnx is kept and passed its FP16 gate here (top-1 agreement " in line
    assert line.endswith("resnet-export trt --onnx cifar_resnet.fp16.onnx -o cifar_resnet.fp16.plan")
    assert (tmp_path / "cifar_resnet.fp16.onnx").is_file() and not (tmp_path / "cifar_resnet.fp16.plan").exists()


def test_a_request_gates_random_weights_on_fidelity_and_keeps_the_thresholds_asked_for():
    from resnet_export.pipeline import PrecisionRequest
    from resnet_export.checks.verify import GATES

    assert PrecisionRequest("fp16").gate(random_weights=True) == RANDOM_WEIGHT_PLAN_GATES["fp16"]
    assert PrecisionRequest("fp16").gate() == GATES["fp16"]
    int8 = PrecisionRequest("int8", IMAGES, min_cosine=0.9).gate(random_weights=True)
    assert int8.min_cosine == 0.9 and int8.min_top1_agreement == 0.0


def test_default_output_names(resnet18_onnx, tmp_path, monkeypatch):
    from resnet_export.pipeline import default_output, side_onnx_path

    monkeypatch.chdir(tmp_path)
    folded = run("fold", resnet18_onnx.path, "--no-verify")
    assert folded.exit_code == 0 and "-> resnet18.folded.onnx:" in folded.stdout, folded.output
    assert (tmp_path / "resnet18.folded.onnx").is_file() and (tmp_path / "resnet18.folded.onnx.json").is_file()

    assert [default_output("resnet50"), default_output("resnet50", "fp16"), default_output("resnet50", "int8"),
            default_output("resnet50", "int8", "cpu"), default_output("r50.fp16", "int8", "cpu"),
            default_output("resnet50", "int8", suffix=".plan")] == [
        Path("resnet50.onnx"), Path("resnet50.fp16.onnx"), Path("resnet50.int8.onnx"), Path("resnet50.cpu-int8.onnx"),
        Path("r50.cpu-int8.onnx"), Path("resnet50.int8.plan")]
    assert side_onnx_path(Path("resnet50.int8.plan"), "int8") == Path("resnet50.int8.onnx")
    assert side_onnx_path(Path("r50.plan"), "int8") == Path("r50.int8.onnx")


@pytest.mark.parametrize("given, said", [("empty", "the folder is empty"),
                                          ("a.jpg", "a.jpg is an image: give the folder of images that holds it"),
                                          ("notes.txt", "notes.txt is a .txt file"),
                                          ("missing", "calibration data missing does not exist")])
def test_calibration_data_is_checked_before_any_export(tmp_path, monkeypatch, given, said):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.jpg").write_bytes((IMAGES / "cat" / "chelsea.jpg").read_bytes())
    (tmp_path / "notes.txt").write_text("not data")
    assert_one_line_error(run("trt", *TINY, "--int8", "--calib", given), said)
    assert_one_line_error(run("quantize", "nothing.onnx", "--int8", "--calib", given), said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "empty", "notes.txt"]  # nothing exported


def _doctored(source, folder, passed):
    """A copy of ``source`` whose manifest says it passed or failed its gate."""
    artifact = folder / "m.onnx"
    shutil.copyfile(source, artifact)
    manifest = json.loads(source.with_name(source.name + ".json").read_text())
    manifest["verification"].update(passed=passed, failures=[] if passed else ["top-1 agreement 50.0% < 97.00%"])
    artifact.with_name("m.onnx.json").write_text(json.dumps(manifest))
    return artifact


def test_a_failed_artifact_is_served_only_when_asked_and_then_with_a_warning(resnet18_onnx, tmp_path):
    failed = _doctored(resnet18_onnx.path, tmp_path, passed=False)
    image = IMAGES / "cat" / "chelsea.jpg"
    said = "failed its gate when it was made (top-1 agreement 50.0% < 97.00%): not served; pass --allow-failed"
    assert_one_line_error(run("predict", failed, image, "-o", tmp_path / "p.jsonl"), said, code=2)
    assert_one_line_error(run("triton", failed, "--repo", tmp_path / "repo"), said, code=2)
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "repo").exists()
    served = run("predict", failed, image, "-o", tmp_path / "p.jsonl", "--allow-failed")
    assert served.exit_code == 0, served.output
    assert "m.onnx FAILED its gate when it was made (top-1 agreement 50.0% < 97.00%): served anyway" in served.stderr
    assert "FAILED its gate, served as asked" in served.stdout
    bare = tmp_path / "bare" / "m.onnx"
    bare.parent.mkdir()
    shutil.copyfile(resnet18_onnx.path, bare)
    unverified = run("predict", bare, image, "-o", tmp_path / "q.jsonl")
    assert unverified.exit_code == 0 and "m.onnx has no manifest: served unverified" in unverified.stderr


def test_predict_takes_one_image_or_several(resnet18_onnx, tmp_path):
    one = run("predict", resnet18_onnx.path, IMAGES / "cat" / "chelsea.jpg", "-o", tmp_path / "one.jsonl")
    assert one.exit_code == 0, one.output
    assert [json.loads(line)["path"] for line in (tmp_path / "one.jsonl").read_text().splitlines()] == [
        str(IMAGES / "cat" / "chelsea.jpg")]
    images = [IMAGES / "cup" / "coffee.jpg", IMAGES / "logo" / "logo.png"]
    two = run("predict", resnet18_onnx.path, *images, "-o", tmp_path / "two.csv")
    assert two.exit_code == 0 and len((tmp_path / "two.csv").read_text().splitlines()) == 3, two.output
    assert_one_line_error(run("predict", resnet18_onnx.path, resnet18_onnx.path, "-o", tmp_path / "x.jsonl"),
                          "resnet18.onnx is not an image")


def test_debug_may_stand_anywhere_on_the_line(tmp_path):
    assert_one_line_error(run("fold", tmp_path / "missing.onnx"), "missing.onnx not found")
    shown = run("fold", tmp_path / "missing.onnx", "--debug")
    assert shown.exit_code == 1 and type(shown.exception).__name__ == "OnnxError"  # the traceback, not one line


def test_fused_and_exact_runs_of_one_graph_are_judged_by_closeness_not_top1():
    """Random-weight logits are near-ties: rounding alone flips a top-1 at cosine 0.9999 (one flip in 7 rows of a
    random resnet50 failed the README's default path); a saturated kernel's outputs move far (0.24-0.65)."""
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((7, 10)) * 0.01 + 5.0
    exact[0, :2] = [5.03, 5.0299]  # a near-tie
    fused = exact.copy()
    fused[0, :2] = [5.0299, 5.03]  # rounding flips it
    metrics = compare(exact, fused)
    assert metrics["top1_agreement"] < 1 and metrics["min_cosine"] > 0.9999
    assert gate_failures(metrics, KERNEL_GATE) == []
    saturated = exact + rng.standard_normal(exact.shape) * 5
    assert gate_failures(compare(exact, saturated), KERNEL_GATE)


@pytest.mark.slow
def test_the_readmes_default_path_as_typed(tmp_path, monkeypatch):
    """resnet50 without weights, two dozen images, every command as the README types it, in an empty folder:
    quantize for the CPU target passes its gate, trt makes and keeps the TensorRT-target INT8 ONNX (its gate passed)
    and says how to finish where TensorRT is, and predict serves the CPU file for one image."""
    from PIL import Image, ImageOps

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    data = tmp_path / "data"
    data.mkdir()
    sources = sorted(p for p in IMAGES.rglob("*") if p.suffix in (".jpg", ".png"))
    for index in range(24):  # two dozen images: the test images, mirrored and rotated
        image = Image.open(sources[index % len(sources)]).convert("RGB")
        image = ImageOps.mirror(image) if index % 2 else image
        image = image.rotate(15 * (index // len(sources)), expand=True)
        image.save(data / f"{index:02d}.jpg")
    assert run("onnx", "--arch", "resnet50").exit_code == 0
    cpu = run("quantize", "resnet50.onnx", "--int8", "--calib", "data/", "--target", "cpu")
    assert cpu.exit_code == 0, cpu.output
    assert "resnet50.onnx -> resnet50.cpu-int8.onnx: INT8" in cpu.stdout and ": PASS" in cpu.stdout
    trt = run("trt", "--int8", "--calib", "data/")
    assert_one_line_error(trt, "resnet50.int8.onnx is kept and passed its INT8 gate here", code=4)
    assert "is INT8 for TensorRT: on a CPU it runs slower than the FP32 model" in trt.stderr
    assert trt.stderr.strip().endswith("resnet-export trt --onnx resnet50.int8.onnx -o resnet50.int8.plan")
    served = run("predict", "resnet50.cpu-int8.onnx", "data/00.jpg", "-o", "preds.jsonl")
    assert served.exit_code == 0 and "1 images -> preds.jsonl" in served.stdout, served.output
    assert "served unverified" not in served.stderr and "FAILED" not in served.stderr
