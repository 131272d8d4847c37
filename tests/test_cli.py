"""The command line through click's CliRunner: results, one-line errors, exit codes."""

import json
import subprocess
import sys
import warnings

import onnx
import pytest
import torch
from click.testing import CliRunner

from resnet_export.cli import main
from resnet_export.errors import EXIT_GATE_FAILED, ModelError
from resnet_export.source.models import ARCHS, load_model
from resnet_export.onnx_graph import read_metadata

from .conftest import IMAGES, USER_MODELS

SMALL = ["--arch", "resnet18", "--num-classes", "10", "--input-size", "64"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, pattern, code=1):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:], result.stderr  # one error line, the last thing said
    assert "Traceback" not in result.output
    assert pattern in lines[-1], lines[-1]


@pytest.mark.slow  # arch_summary is in the quick loop (test_models.py); this is the command's 2 s of meta forwards
def test_list_prints_every_arch():
    result = run("list")
    assert result.exit_code == 0
    for arch in ARCHS:
        assert arch in result.stdout
    assert "25.6M" in result.stdout and "IMAGENET1K_V2" in result.stdout


def test_onnx_command_exports_and_verifies(tmp_path):
    out = tmp_path / "r18.onnx"
    result = run("onnx", *SMALL, "--images", IMAGES, "-o", out)
    assert result.exit_code == 0, result.output
    assert "resnet18 -> " in result.stdout and ": PASS" in result.stdout
    assert "folded 20 BatchNorm, 0 BatchNormalization left" in result.stdout
    assert "Warning: no --weights given" in result.stderr
    manifest = json.loads((tmp_path / "r18.onnx.json").read_text())
    assert manifest["verification"]["metrics"]["top1_agreement"] == 1.0


@pytest.mark.slow  # the quick loop has checkpoints (test_models.py), --no-verify and fixed batches (test_export.py)
def test_onnx_command_with_checkpoint_and_no_verify(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save({"model": load_model(arch="resnet18", num_classes=10).module.state_dict()}, ckpt)
    result = run("onnx", *SMALL, "--weights", ckpt, "--no-verify", "--batch", "2", "-o", tmp_path / "r.onnx")
    assert result.exit_code == 0, result.output
    assert "PASS" not in result.stdout and "Warning" not in result.stderr
    manifest = json.loads((tmp_path / "r.onnx.json").read_text())
    assert manifest["verification"] is None and manifest["source"]["weights_sha256"]


def test_fold_command(tmp_path):
    model = load_model(arch="resnet18", num_classes=10).module.eval()
    foreign = tmp_path / "foreign.onnx"
    with warnings.catch_warnings():  # the legacy exporter's deprecation and mutation notes
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(foreign), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    result = run("fold", foreign, "-o", tmp_path / "folded.onnx")
    assert result.exit_code == 0, result.output
    assert "folded 20 BatchNorm" in result.stdout and "20 training-mode" in result.stdout
    assert "PASS" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["onnx", "--arch", "resnet05"], "Error: unknown arch 'resnet05'; did you mean resnet50"),
        (["onnx", *SMALL, "--weights", "missing.pth"], "checkpoint missing.pth not found"),
        (["onnx", "--model", "missing.py:fn"], "--model file missing.py not found"),
        (["onnx", "--model", f"{USER_MODELS}:returns_dict"], "returned a dict, not a torch.nn.Module"),
        (["onnx", "--model", f"{USER_MODELS}:broken_resnet", "--input-size", "16"],
         "forward pass failed in module '1' (BrokenResidual)"),
        (["fold", "missing.onnx"], "ONNX file missing.onnx not found"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    assert_one_line_error(run(*args, "-o", tmp_path / "out.onnx"), message)
    assert list(tmp_path.iterdir()) == []


def test_output_directory_missing(tmp_path):
    result = run("onnx", *SMALL, "-o", tmp_path / "nope" / "out.onnx")
    assert_one_line_error(result, "does not exist")


def test_output_directory_not_writable(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir(mode=0o555)
    target = readonly if not _is_root() else "/proc"  # root writes anywhere but /proc
    assert_one_line_error(run("onnx", *SMALL, "-o", f"{target}/out.onnx"), "is not writable")


def _is_root():
    import os

    return os.geteuid() == 0


def test_corrupt_checkpoint_via_cli(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line_error(run("onnx", *SMALL, "--weights", bad, "-o", tmp_path / "o.onnx"), "truncated or corrupt")


def test_gate_failure_exit_code(tmp_path):
    differs = tmp_path / "differs.py"
    differs.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.conv = torch.nn.Conv2d(3, 10, 3)\n"
        "    def forward(self, x):\n"
        "        y = self.conv(x).mean((2, 3))\n"
        "        return y.flip(1) if torch.onnx.is_in_onnx_export() else y\n"
        "def make():\n    return M()\n"
    )
    result = run("onnx", "--model", f"{differs}:make", "--input-size", "16", "-o", tmp_path / "d.onnx")
    assert_one_line_error(result, "failed the FP32 gate: top-1 agreement", code=EXIT_GATE_FAILED)
    assert (tmp_path / "d.onnx").is_file()


def test_debug_shows_the_traceback():
    result = CliRunner().invoke(main, ["--debug", "onnx", "--arch", "resnet05", "-o", "x.onnx"])
    assert isinstance(result.exception, ModelError)


@pytest.mark.parametrize("args, message", [
    (["onnx", "--input-size", "0x5"], "H or HxW"),
    (["onnx", "--opset", "18"], "opset 18 is below 19, which `quantize` and `trt` need"),  # refused here, not later
    (["triton", str(IMAGES), "--repo", "r", "--preferred-batch", "2.7"], "'2.7' is not a comma-separated list of "
                                                                           "positive integers"),
    (["triton", str(IMAGES), "--repo", "r", "--preferred-batch", "4,0"], "positive integers"),
])
def test_bad_option_values_are_usage_errors_at_the_command_that_took_them(tmp_path, args, message):
    result = run(*args, "-o", tmp_path / "x.onnx") if args[0] == "onnx" else run(*args)
    assert_one_line_error(result, message, code=2)


def test_python_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "resnet_export", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "resnet-export, version" in result.stdout


def test_serving_an_onnx_on_onnx_runtime_imports_no_torch(resnet18_onnx):
    """What a Ray actor or a predict process of an ONNX does (open it, run a batch) never imports torch: 2.6 s each."""
    code = ("import sys, numpy as np\n"
            "from pathlib import Path\n"
            "from resnet_export.deploy.inference import open_artifact\n"
            f"runner, spec, backend = open_artifact(Path({str(resnet18_onnx.path)!r}), 'ort')\n"
            "runner.infer(np.zeros((1, 3, 64, 64), np.float32))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_the_package_imports_no_heavy_library():
    """`import resnet_export` and the CLI module stay light (the API loads lazily); names still resolve."""
    code = ("import sys, resnet_export, resnet_export.cli\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'modelopt') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(resnet_export.load_model) and 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_onnx_preprocessing_and_opset_options(tmp_path):
    out = tmp_path / "gray.onnx"
    result = run("onnx", "--arch", "resnet18", "--num-classes", "4", "--in-channels", "1", "--input-size", "32x48",
                 "--mean", "0.5", "--std", "0.25", "--opset", "19", "-o", out)
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 19
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 32, 48]
    stored = read_metadata(model)["preprocessing"]
    assert stored["mean"] == [0.5] and stored["std"] == [0.25] and stored["channels"] == 1
    assert_one_line_error(run("onnx", "--arch", "resnet18", "--mean", "0.5,0.5", "-o", tmp_path / "x.onnx"),
                          "--mean has 2 values but the model takes 3 channels")


@pytest.mark.slow
def test_onnx_seed_sets_random_weights(tmp_path):
    """--seed draws the random initialisation: the same seed gives the same weights, another seed others."""
    def weights(seed, name):
        out = tmp_path / name
        result = run("onnx", "--arch", "resnet18", "--num-classes", "4", "--input-size", "32", "--seed", seed,
                     "--no-verify", "-o", out)
        assert result.exit_code == 0, result.output
        return [onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer]

    first, again, other = weights(3, "a.onnx"), weights(3, "b.onnx"), weights(4, "c.onnx")
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert sum(not (a == c).all() for a, c in zip(first, other, strict=True)) > len(first) // 2


def test_fold_without_verification(tmp_path, resnet18_onnx):
    result = run("fold", resnet18_onnx.path, "--no-verify", "-o", tmp_path / "refolded.onnx")
    assert result.exit_code == 0, result.output
    assert "vs input" not in result.stdout and "PASS" not in result.stdout
    assert json.loads((tmp_path / "refolded.onnx.json").read_text())["verification"] is None


@pytest.mark.slow
def test_bench_threads_setting_is_honoured_as_measured(tmp_path):
    """--threads 1: every CPU row keeps at most about one core busy (measured: process CPU time over wall time).
    Fails if a backend ignores the setting and spreads over both cores; a loaded machine can only lower the figure,
    so load never fails it (how many cores two threads keep busy depends on the load: not asserted)."""
    from .bench.test_bench import intel_cpu

    def rows(threads):
        report = tmp_path / f"threads-{threads}"
        result = run("bench", "--arch", "resnet18", "--num-classes", "10", "--input-size", "64", "--backends",
                     "torch,ort,ort-openvino,openvino", "--precisions", "fp32", "--batch-sizes", "4", "--warmup", "1",
                     "--min-time", "0.5", "--threads", str(threads), "--report", report)
        assert result.exit_code == 0, result.output
        return {row["backend"]: row for row in json.loads((report / "report.json").read_text())["rows"]}

    before = torch.get_num_threads()
    try:
        one = rows(1)
    finally:
        torch.set_num_threads(before)  # bench sets torch's threads process-wide
    ran = {"torch", "ort", "openvino"} | ({"ort-openvino"} if intel_cpu() else set())  # the plugin: Intel only
    one = {b: r for b, r in one.items() if r["status"] == "ok"}
    assert {b: r["threads_setting"] for b, r in one.items()} == dict.fromkeys(ran, 1)
    assert all(0 < r["cores_busy"] < 1.3 for r in one.values()), {b: r["cores_busy"] for b, r in one.items()}


def test_time_calls_runs_for_min_time_on_a_fake_clock():
    from resnet_export.bench.harness import Settings, time_calls

    def fake_clock():
        ticks = iter(range(10_000))
        return lambda: next(ticks) * 0.1  # every reading of the clock advances it by 0.1 s

    calls = []
    timings = time_calls(lambda: calls.append(1), Settings(warmup=2, min_time=1.0), now=fake_clock())
    # each run reads the clock twice (0.1 s apart) and the loop once: 0.3 s a run from the start at 0
    assert timings == [pytest.approx(0.1)] * 4 and len(calls) == 2 + 4
    assert len(time_calls(lambda: None, Settings(warmup=0, min_time=0.0), now=fake_clock())) == 3  # at least 3
    assert len(time_calls(lambda: None, Settings(warmup=0, iters=7, min_time=100), now=fake_clock())) == 7
