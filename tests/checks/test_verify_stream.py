"""Verification at the size of a validation set: streamed (memory flat in the images), resumable, the same on Ray,
with the statistics a reviewer asks for (statistics.py)."""

import json
import math
import re
import shutil
import tracemalloc

import numpy as np
import pytest

from resnet_export.data import DataError, ImageFolder, image_folder, image_inputs
from resnet_export.onnx_graph import onnx_preprocessing
from resnet_export.runtime.runners import OrtRunner, TorchRunner
from resnet_export.checks.statistics import (
    accuracy_statistics,
    mcnemar_exact,
    paired_difference,
    per_class_drops,
    wilson,
)
from resnet_export.checks.verify import GATES, verify
from resnet_export.checks.results import ResultsFile

from ..digits import FACTORY
from ..test_cli import run


def test_wilson_interval_known_values():
    # Wilson (1927) / Newcombe (1998, single proportion) Table I: 0/10 -> 0 to 0.2775, 1/29 -> 0.0061 to 0.1718
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson(1, 29) == (pytest.approx(0.0061, abs=1e-4), pytest.approx(0.1718, abs=1e-4))
    low, high = wilson(81, 263)  # Newcombe's 81/263: 0.2553 to 0.3662
    assert (low, high) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))


def test_mcnemar_exact_p_is_the_two_sided_binomial_tail():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)  # P(X <= 1) for Bin(10, 1/2), doubled
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 20) == pytest.approx(2 / 2 ** 20)
    assert mcnemar_exact(30000, 30300) == pytest.approx(0.2229, abs=1e-3)  # a validation set's counts, at once
    assert mcnemar_exact(10, 2000) < 1e-300


def test_paired_difference_holds_its_estimate_and_covers_at_the_stated_rate():
    difference, low, high = paired_difference(12, 5, 1, 2)
    assert difference == pytest.approx(4 / 20) and low < 0 < difference < high < 1
    assert paired_difference(10, 3, 3, 4)[0] == 0 and paired_difference(0, 0, 0, 0) == (0.0, -1.0, 1.0)
    # coverage: a candidate that loses 3% of the reference's right answers and gains 5% of its wrong ones, 400 images,
    # 2,000 trials: about 95% of the intervals hold the true drop (0.76 * 0.03 - 0.24 * 0.05)
    rng = np.random.default_rng(0)
    truth, covered = 0.76 * 0.03 - 0.24 * 0.05, 0
    for _ in range(2000):
        ref = rng.random(400) < 0.76
        flip = rng.random(400)
        cand = np.where(ref, flip >= 0.03, flip < 0.05)
        _, lo, hi = paired_difference(*(int(np.sum(m)) for m in (ref & cand, ref & ~cand, ~ref & cand, ~ref & ~cand)))
        covered += lo <= truth <= hi
    assert 0.93 <= covered / 2000 <= 0.975


def test_accuracy_statistics_and_classes_that_fell():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ref = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)
    cand = np.array([1, 0, 0, 1, 1, 1, 1, 0], bool)
    stats = accuracy_statistics(ref, cand)
    assert (stats["right_to_wrong"], stats["wrong_to_right"]) == (2, 1)
    assert stats["mcnemar_p"] == 1.0
    low, high = stats["accuracy_drop_points_ci95"]
    assert low < 100 * (6 - 5) / 8 < high
    fallen = per_class_drops(labels, ref, cand, ["zero", "one"])
    assert [(c["name"], c["drop_points"]) for c in fallen] == [("zero", 50.0)]  # class 1 rose: not listed


class Interrupted(Exception):
    pass


class StopsAfter:
    """A runner that stops the run (as Ctrl-C would) on its ``calls``-th batch."""

    def __init__(self, runner, calls):
        self.runner, self.calls, self.fixed_batch = runner, calls, None

    def infer(self, batch):
        self.calls -= 1
        if self.calls < 0:
            raise Interrupted
        return self.runner.infer(batch)


def _figures(v):
    return json.dumps({"metrics": v.metrics, "kernels": v.kernels, "failures": v.failures}, sort_keys=True)


@pytest.mark.slow
def test_streamed_verification_matches_in_memory_resumes_exactly_and_decoders_do_not_change_it(
        digits, digits_cpu_int8, tmp_path):
    spec = onnx_preprocessing(digits_cpu_int8.path)
    folder = image_folder(digits.val, spec)
    reference, candidate = TorchRunner(digits.model.module), OrtRunner(digits_cpu_int8.path)
    exact = OrtRunner(digits_cpu_int8.path, exact=True)
    streamed = verify(reference, candidate, folder, GATES["int8"], exact=exact)
    in_memory = verify(reference, candidate, image_inputs(digits.val, spec), GATES["int8"], exact=exact)
    assert _figures(streamed) == _figures(in_memory)
    folder.decoders = 0  # decoded in the runners' thread, not by the pool: the same batches, the same figures
    assert _figures(verify(reference, candidate, folder, GATES["int8"], exact=exact)) == _figures(streamed)

    out = tmp_path / "val.jsonl"
    header = {"artifact": "int8_cpu.onnx"}
    with pytest.raises(Interrupted):
        verify(reference, StopsAfter(candidate, 20), folder, GATES["int8"], exact=exact,
               results=ResultsFile(out, header))
    partial = out.with_name("val.jsonl.partial")
    written = partial.read_text().splitlines(keepends=True)
    assert 100 < len(written) < 200 and not out.exists()
    partial.write_text("".join(written[:-10]) + '{"i": 999, "batch": 9')  # killed mid-block: a torn line, 10 lost
    with pytest.raises(DataError, match="interrupted run: pass `resume`"):
        ResultsFile(out, header)
    resumed = verify(reference, candidate, folder, GATES["int8"], exact=exact,
                     results=ResultsFile(out, header, resume=True))
    assert _figures(resumed) == _figures(streamed)
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert [r["i"] for r in rows] == list(range(len(folder)))  # each image once, in order
    assert sum(r["top_ref"][0] == r["label"] for r in rows) / len(rows) == streamed.metrics["accuracy_reference"]
    other = tmp_path / "other.jsonl"
    other.with_name("other.jsonl.partial").write_text(json.dumps({"results": "resnet-export verify"}) + "\n")
    with pytest.raises(DataError, match="another verification"):
        verify(reference, candidate, folder, GATES["int8"], results=ResultsFile(other, header, resume=True))


@pytest.mark.slow
def test_memory_stays_flat_in_the_number_of_images(digits, tmp_path):
    """Peak traced allocations over 1,300 images within a small margin of those over 100 (every image in memory
    would add its 4 kB input twice over: about 10 MB)."""
    spec = digits.model.preprocessing
    folder = image_folder(digits.train, spec)
    runner = TorchRunner(digits.model.module)

    def peak(count):
        subset = ImageFolder(folder.root, folder.paths[:count], spec, folder.classes, folder.labels[:count],
                             folder.labels_by_order)
        verify(runner, runner, subset, GATES["fp32"])  # warm
        tracemalloc.start()
        try:
            verify(runner, runner, subset, GATES["fp32"])
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(100), peak(1300)
    assert large - small < 2e6, (small, large)


@pytest.mark.slow
def test_verify_cli_states_the_statistics_and_writes_results(digits, digits_cpu_int8, tmp_path):
    model = ["--model", FACTORY, "--weights", digits.checkpoint, "--input-size", "32"]
    out = tmp_path / "r.jsonl"
    result = run("verify", digits_cpu_int8.path, *model, "--images", digits.val, "--results", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.with_suffix(".json").read_text())["verification"]["metrics"]
    s = summary["statistics"]
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    lost = sum(r["top_ref"][0] == r["label"] != r["top_cand"][0] for r in rows)
    gained = sum(r["top_cand"][0] == r["label"] != r["top_ref"][0] for r in rows)
    assert (s["right_to_wrong"], s["wrong_to_right"]) == (lost, gained)
    assert s["mcnemar_p"] == mcnemar_exact(lost, gained)
    low, high = s["accuracy_candidate_ci95"]
    assert low < summary["accuracy_candidate"] < high
    assert re.search(r"accuracy drop -?\d+\.\d\d points \(95% CI -?\d+\.\d\d to -?\d+\.\d\d\), \d+ right->wrong, "
                     r"\d+ wrong->right, McNemar p=", result.stdout)
    assert f"per-image results: {out}" in result.stdout
    again = run("verify", digits_cpu_int8.path, *model, "--images", digits.val, "--results", out, "--resume")
    assert again.exit_code == 0, again.output  # a finished run: nothing left to resume, run afresh
    inspected = run("inspect", digits_cpu_int8.path)  # made with --val: the manifest's statistics, the classes
    assert inspected.exit_code == 0, inspected.output
    assert "Statistics: accuracy drop" in inspected.stdout and "Accuracy, 95% CI: reference" in inspected.stdout
    made = json.loads(run("inspect", digits_cpu_int8.path, "--json").stdout)["manifest"]["verification"]["metrics"]
    fallen = made["statistics"]["classes_fallen_most"]
    assert all(c["accuracy_candidate"] < c["accuracy_reference"] for c in fallen)
    assert not fallen or "Classes whose accuracy fell most" in inspected.stdout
    no_folder = run("verify", digits_cpu_int8.path, *model, "--results", out)
    assert no_folder.exit_code == 2 and "go with --images" in no_folder.output


@pytest.mark.slow
def test_verify_on_a_local_ray_cluster_gives_the_same_figures(digits, digits_cpu_int8, tmp_path):
    import ray

    model = ["--model", FACTORY, "--weights", digits.checkpoint, "--input-size", "32"]
    folder = tmp_path / "val"
    shutil.copytree(digits.val, folder)
    (folder / "3" / "empty.png").write_bytes(b"")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run("verify", digits_cpu_int8.path, *model, "--images", folder, "--ray", "--workers", "2",
                     "--results", tmp_path / "ray.jsonl")
    finally:
        ray.shutdown()
    local = run("verify", digits_cpu_int8.path, *model, "--images", folder, "--results", tmp_path / "local.jsonl")
    assert on_ray.exit_code == 0, on_ray.output
    assert local.exit_code == 0, local.output
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    figures = [json.loads((tmp_path / f"{n}.json").read_text())["verification"]["metrics"] for n in ("ray", "local")]
    assert figures[0] == figures[1] and figures[0]["samples"] == 449
    assert math.isfinite(figures[0]["statistics"]["mcnemar_p"])
