"""`predict`: an artifact on an image folder, rows as JSONL or CSV, checked against running the ONNX directly."""

import csv
import re
import json
import shutil

import numpy as np
import pytest

from resnet_export.data import image_inputs
from resnet_export.onnx_graph import onnx_preprocessing
from resnet_export.deploy.inference import ranked
from resnet_export.runtime.runners import OrtRunner

from ..conftest import IMAGES
from ..test_cli import assert_one_line_error, run


def _direct_top1(onnx_path, folder):
    inputs = image_inputs(folder, onnx_preprocessing(onnx_path))
    return OrtRunner(onnx_path).infer(inputs.array).argmax(axis=1), inputs


def test_ranked_is_softmax_order():
    indices, scores = ranked(np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]]), 2)
    assert indices.tolist() == [[1, 2], [2, 0]]
    assert scores[0, 0] == pytest.approx(np.exp(3) / np.exp([1, 3, 2]).sum()) and scores[0, 0] > scores[0, 1]


def test_predict_jsonl_matches_the_onnx_and_counts_unreadable_images(resnet18_onnx, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(IMAGES, folder)
    (folder / "cat" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "preds.jsonl"
    result = run("predict", resnet18_onnx.path, folder, "--top-k", "3", "--batch", "4", "-o", out)
    assert result.exit_code == 0, result.output
    assert "6 images ->" in result.stdout and "1 unreadable skipped" in result.stdout
    assert "top-1 accuracy" in result.stdout  # five class folders, a five-class model
    assert "skipped 1 unreadable images of 7: cat/broken.jpg" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected, inputs = _direct_top1(resnet18_onnx.path, IMAGES)
    assert [r["topk"][0]["index"] for r in rows] == expected.tolist()
    assert all(len(r["topk"]) == 3 and r["topk"][0]["score"] >= r["topk"][1]["score"] for r in rows)
    accuracy = float(np.mean(expected == inputs.labels))
    assert f"top-1 accuracy {accuracy:.1%}" in result.stdout


def test_predict_csv_and_openvino(resnet18_onnx, tmp_path):
    out = tmp_path / "preds.csv"
    result = run("predict", resnet18_onnx.path, IMAGES, "--backend", "openvino", "-o", out)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    inputs = image_inputs(IMAGES, onnx_preprocessing(resnet18_onnx.path))
    logits = OrtRunner(resnet18_onnx.path).infer(inputs.array)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for row, p in zip(table, probabilities):  # OpenVINO's top-1 is ONNX Runtime's, up to near-ties of random logits
        assert float(row["score_1"]) == pytest.approx(p.max(), abs=1e-4)
        assert p[int(row["index_1"])] == pytest.approx(p.max(), abs=1e-4)
    assert set(table[0]) == {"path", *[f"{n}_{r}" for r in range(1, 6) for n in ("index", "class", "score")]}


@pytest.mark.parametrize("args, message", [
    (["--backend", "trt"], "backend trt does not run .onnx files"),
    (["-o", "{tmp}/preds.txt"], "must end in .jsonl or .csv"),
])
def test_predict_errors_write_nothing(resnet18_onnx, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    output = [] if "-o" in args else ["-o", tmp_path / "preds.jsonl"]
    assert_one_line_error(run("predict", resnet18_onnx.path, IMAGES, *args, *output), message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_predict_on_the_digits_gives_the_accuracy_of_verification(digits_r18, tmp_path):
    out = tmp_path / "digits.jsonl"
    result = run("predict", digits_r18.fp32, digits_r18.val, "-o", out)
    assert result.exit_code == 0, result.output
    expected, inputs = _direct_top1(digits_r18.fp32, digits_r18.val)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 449 and [r["topk"][0]["index"] for r in rows] == expected.tolist()
    assert f"top-1 accuracy {np.mean(expected == inputs.labels):.1%}" in result.stdout


@pytest.mark.slow
def test_predict_on_a_local_ray_cluster_gives_the_same_rows(resnet18_onnx, tmp_path):
    import ray

    folder = tmp_path / "images"
    shutil.copytree(IMAGES, folder)
    (folder / "cup" / "empty.png").write_bytes(b"")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run("predict", resnet18_onnx.path, folder, "--ray", "--workers", "2", "--batch", "1",
                     "-o", tmp_path / "ray.jsonl")
    finally:
        ray.shutdown()
    local = run("predict", resnet18_onnx.path, folder, "--batch", "1", "-o", tmp_path / "local.jsonl")
    assert on_ray.exit_code == 0, on_ray.output
    assert local.exit_code == 0, local.output
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    # counted from the rows (each actor tags its own with its process id), not echoed from the option: which actors
    # got batches is Ray's scheduling (under load one may take them all), so 1 or 2 of the 2
    assert "1 unreadable skipped" in on_ray.stdout and re.search(r"on Ray, [12] of 2 workers ran batches", on_ray.stdout)


@pytest.mark.slow
def test_predict_starts_and_stops_its_own_ray_and_joins_a_running_one(resnet18_onnx, tmp_path):
    """--ray alone starts a local Ray of its own and shuts it down; --ray ADDRESS joins the
    cluster `ray start` runs (on a free port, with its own temp dir, where Ray writes its address file, stopped by
    ending its own process: another Ray on this machine is neither joined nor stopped)."""
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    import ray

    assert not ray.is_initialized()
    own = run("predict", resnet18_onnx.path, IMAGES, "--ray", "--workers", "1", "-o", tmp_path / "own.jsonl")
    assert own.exit_code == 0, own.output
    assert not ray.is_initialized()  # the toolkit's own cluster is gone with the command
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="rx-ray-")  # short: Ray's Unix sockets live under it
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                             "--temp-dir", temp, "--include-dashboard", "false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # a background job (`make test &`, CI) starts with SIGINT ignored; the head would inherit
                            # that and never stop on the interrupt below (seen: no end in 120 s)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while head.poll() is None and time.time() < deadline:
            with socket.socket() as gcs:
                if gcs.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        assert head.poll() is None, head.stderr.read()[-2000:]
        joined = run("predict", resnet18_onnx.path, IMAGES, "--ray", f"127.0.0.1:{port}", "--workers", "1",
                     "-o", tmp_path / "joined.jsonl")
    finally:
        # `ray start --block` stops its cluster on an interrupt in about a second (measured 1.3 s, nothing left
        # running); on SIGTERM it waits out a 30 s graceful shutdown first
        head.send_signal(signal.SIGINT)
        try:
            head.wait(timeout=60)
        finally:
            if head.poll() is None:  # leave no cluster behind, even when this test fails
                head.terminate()
                head.wait(timeout=60)
            shutil.rmtree(temp, ignore_errors=True)
    assert joined.exit_code == 0, joined.output
    local = run("predict", resnet18_onnx.path, IMAGES, "-o", tmp_path / "local.jsonl")
    rows = (tmp_path / "local.jsonl").read_text()
    assert (tmp_path / "own.jsonl").read_text() == rows and (tmp_path / "joined.jsonl").read_text() == rows


def test_ray_missing_is_a_one_line_error_naming_the_extra(resnet18_onnx, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without the extra: import ray fails
    result = run("predict", resnet18_onnx.path, IMAGES, "--ray", "-o", tmp_path / "p.jsonl")
    assert_one_line_error(result, "pip install 'ray[data]'")
    assert not (tmp_path / "p.jsonl").exists()


def _rows(path):
    return path.read_text().splitlines()


def test_a_partial_file_needs_resume_and_resume_gives_the_same_rows(resnet18_onnx, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert run("predict", resnet18_onnx.path, IMAGES, "--batch", "2", "-o", whole).exit_code == 0
    out = tmp_path / "preds.jsonl"
    partial = tmp_path / "preds.jsonl.partial"
    lines = _rows(whole)
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # three rows and a torn fourth, as a kill leaves
    assert_one_line_error(run("predict", resnet18_onnx.path, IMAGES, "-o", out), "pass --resume to continue it")
    assert not out.exists()
    result = run("predict", resnet18_onnx.path, IMAGES, "--resume", "-o", out)
    assert result.exit_code == 0, result.output
    assert "(3 from the interrupted run)" in result.stdout and " img/s" in result.stdout
    assert _rows(out) == lines and not partial.exists()


@pytest.mark.slow
def test_a_killed_predict_resumes_to_the_rows_of_an_uninterrupted_run(resnet18_onnx, tmp_path):
    """Ctrl-C a real `predict` process halfway through a folder: no OUT, and it says how to resume; SIGKILL the resumed
    run halfway too: no OUT, and --resume completes it to the rows of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from PIL import Image

    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted(p for p in IMAGES.rglob("*") if p.is_file())
    for i in range(300):
        Image.open(sources[i % len(sources)]).convert("RGB").resize((40 + i % 30, 48)).save(folder / f"{i:04d}.png")
    out, partial = tmp_path / "preds.csv", tmp_path / "preds.csv.partial"
    command = [sys.executable, "-m", "resnet_export", "predict", str(resnet18_onnx.path), str(folder), "--batch", "4",
               "-o", str(out)]

    def interrupted(args, rows, sig):
        """Run ``args``, send ``sig`` once the partial file holds ``rows`` lines; its exit code and stderr."""
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a job may ignore it
        deadline = time.time() + 120
        while process.poll() is None and time.time() < deadline and (
                not partial.exists() or partial.read_text().count("\n") < rows):
            time.sleep(0.05)
        assert process.poll() is None, f"predict ended (code {process.returncode}) before it could be stopped halfway"
        os.kill(process.pid, sig)
        return process.wait(), process.stderr.read()

    code, said = interrupted(command, 60, signal.SIGINT)
    assert code == 130 and "run the same command with --resume to continue" in said, said
    assert not out.exists() and "Traceback" not in said
    code, _ = interrupted([*command, "--resume"], 120, signal.SIGKILL)
    written = partial.read_text().count("\n") - 1
    assert code == -signal.SIGKILL and 120 <= written < 300 and not out.exists()  # nothing that looks complete
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({written} from the interrupted run)" in resumed.stdout
    whole = tmp_path / "whole.csv"
    assert subprocess.run([*command[:-1], str(whole)], capture_output=True, timeout=300).returncode == 0
    assert out.read_text() == whole.read_text()  # each image once, the same rows


def this_kernel_class() -> str:
    """This CPU's kernel class, observed apart from the toolkit: /proc/cpuinfo's flags (the best INT8 instruction set
    first, by this test's own order) and a fresh probe run."""
    import platform

    from resnet_export.kernel_probe import differs, saturation_case

    from ..quantize.test_cpu_int8 import proc_cpuinfo_flags

    best_first = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
    isa = next((f for f in best_first if f in (proc_cpuinfo_flags() or [])), "no-avx2")
    return f"{platform.machine()}-{isa}-u8s8 {'saturating' if differs(*saturation_case()) else 'exact'}"


def _perturbed_openvino(monkeypatch):
    """OpenVINO made to compute something else (a seam on its runner): its logits lose their sign half the time."""
    from resnet_export.runtime.runners import OpenVinoRunner

    infer = OpenVinoRunner.infer
    monkeypatch.setattr(OpenVinoRunner, "infer", lambda self, batch: infer(self, batch) * np.where(
        np.arange(infer(self, batch).shape[1]) % 2, -1.0, 1.0))


@pytest.fixture
def cpu_int8(resnet18_cpu_int8):
    pytest.importorskip("openvino")
    return resnet18_cpu_int8


def test_a_cpu_int8_onnx_is_served_by_openvino_as_verified_on_this_cpu_class(cpu_int8, resnet18_onnx, tmp_path):
    """quantize --target cpu verifies the artifact on OpenVINO too and records it with this CPU's kernel class;
    predict then serves it with OpenVINO by default and says how it was verified; --backend ort overrides."""
    from resnet_export.checks.serving import default_onnx_backend

    manifest = json.loads(cpu_int8.with_name("q.onnx.json").read_text())
    recorded = manifest["backends"]["openvino"]
    assert recorded["passed"] and recorded["kernel_class"] == this_kernel_class()
    assert recorded["metrics"]["samples"] == manifest["verification"]["metrics"]["samples"]  # same inputs
    assert default_onnx_backend(cpu_int8) == "openvino" and default_onnx_backend(resnet18_onnx.path) == "ort"
    result = run("predict", cpu_int8, IMAGES, "-o", tmp_path / "p.jsonl")
    assert result.exit_code == 0, result.output
    assert f"(openvino; OpenVINO verified on this CPU class ({this_kernel_class()}) when made: INT8 gate passed)" \
        in result.stdout
    forced = run("predict", cpu_int8, IMAGES, "--backend", "ort", "-o", tmp_path / "o.jsonl")
    assert forced.exit_code == 0 and "(ort)" in forced.stdout
    shown = " ".join(run("inspect", cpu_int8).stdout.split())  # rich wraps lines
    assert f"Serving: OpenVINO passed its INT8 gate on {this_kernel_class()} when made" in shown
    assert "serve it with OpenVINO here" in shown


def _with_openvino_record(artifact, folder, **record):
    """A copy of ``artifact`` (``moved.onnx``) whose manifest's OpenVINO result says ``record`` instead."""
    copy = folder / "moved.onnx"
    shutil.copyfile(artifact, copy)
    manifest = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    manifest["backends"]["openvino"].update(record)
    copy.with_name("moved.onnx.json").write_text(json.dumps(manifest))
    return copy


def test_openvino_that_missed_its_gate_on_this_cpu_class_when_made_is_not_used(cpu_int8, tmp_path):
    """A failure recorded on this CPU class stands: predict serves ONNX Runtime and says why, without trying OpenVINO
    again (the slow test below makes OpenVINO fail at quantize time; this one reads its record)."""
    failed = _with_openvino_record(cpu_int8, tmp_path, passed=False, failures=["min cosine 0.1 < 0.95 (recorded)"])
    result = run("predict", failed, IMAGES, "-o", tmp_path / "p.jsonl")
    assert result.exit_code == 0 and "(ort)" in result.stdout, result.output
    assert "OpenVINO's run missed its gate on this CPU class" in result.stderr and "(recorded)" in result.stderr


def test_on_another_cpu_class_openvino_is_verified_now_or_not_used(cpu_int8, tmp_path, monkeypatch):
    """Made elsewhere: predict verifies OpenVINO here against the reference the ONNX recorded before serving with it;
    where OpenVINO computes something else it warns and serves ONNX Runtime, as does triton --backend openvino; and
    verify --backend openvino fails it by name."""
    moved = _with_openvino_record(cpu_int8, tmp_path, kernel_class="x86_64-amx_int8-u8s8 exact (another machine)")
    result = run("predict", moved, IMAGES, "-o", tmp_path / "a.jsonl")
    assert result.exit_code == 0, result.output
    assert f"(openvino; OpenVINO verified here now ({this_kernel_class()}) on the" in result.stdout
    assert "inputs moved.onnx recorded: INT8 gate passed)" in result.stdout
    assert run("verify", moved, "--backend", "openvino").exit_code == 0
    _perturbed_openvino(monkeypatch)
    refused = run("predict", moved, IMAGES, "-o", tmp_path / "b.jsonl")
    assert refused.exit_code == 0, refused.output
    assert "(ort)" in refused.stdout and "not served by OpenVINO: OpenVINO's run misses the INT8 gate" in refused.stderr
    entry = run("triton", moved, "--repo", tmp_path / "repo", "--backend", "openvino")
    assert entry.exit_code == 0 and "onnxruntime backend" in entry.stdout, entry.output
    assert "not served by Triton's openvino backend" in entry.stderr
    failed = run("verify", moved, "--backend", "openvino")
    assert failed.exit_code == 3 and "failed the INT8 gate" in failed.stderr


@pytest.mark.slow
def test_an_artifact_openvino_failed_on_when_made_is_served_by_onnx_runtime(resnet18_onnx, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from resnet_export.pipeline import PrecisionRequest, precision_from_onnx

    _perturbed_openvino(monkeypatch)
    path = precision_from_onnx(resnet18_onnx.path, tmp_path / "bad.onnx", PrecisionRequest(
        "int8", IMAGES, "cpu", calib_size=4, min_agreement=0.0, max_accuracy_drop=100)).path  # ONNX Runtime passed
    recorded = json.loads(path.with_name("bad.onnx.json").read_text())["backends"]["openvino"]
    assert not recorded["passed"] and any("min cosine" in f for f in recorded["failures"])
    for asked in ([], ["--backend", "openvino"]):  # by default, and when OpenVINO is asked for by name
        result = run("predict", path, IMAGES, *asked, "-o", tmp_path / "p.jsonl")
        assert result.exit_code == 0 and "(ort)" in result.stdout, result.output
        assert "OpenVINO's run missed its gate on this CPU class" in result.stderr


def test_resumed_rows_are_scored_once_the_class_count_is_known_and_kept_as_counts(tmp_path):
    """Rows read back from OUT.partial carry no class count; they wait as (folder, top-1) counts, not rows."""
    from resnet_export.deploy.predict import Tally
    from resnet_export.preprocessing import Preprocessing

    tally = Tally(tmp_path, ["cat", "dog"], Preprocessing((32, 32), 32, (0.5,), (0.5,), 1))
    for i in range(1000):  # resumed: right for cats, wrong for half the dogs
        tally.add(str(tmp_path / "cat" / f"{i}.png"), 0)
        tally.add(str(tmp_path / "dog" / f"{i}.png"), i % 2)
    assert tally.accuracy is None and len(tally._pending) == 3  # bounded by folders x classes
    tally.add(str(tmp_path / "dog" / "new.png"), 1, outputs=2)  # the first new batch tells the class count
    assert tally.rows == 2001 and tally.correct == 1000 + 500 + 1 and not tally._pending
    unlabelled = Tally(tmp_path, None, Preprocessing((32, 32), 32, (0.5,), (0.5,), 1))
    unlabelled.add("/elsewhere/x.png", 3, outputs=10)
    assert unlabelled.rows == 1 and unlabelled.accuracy is None
