"""The gates: non-finite outputs fail every one by name, a non-finite reference is an error, a plan's one-flip slack."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from resnet_export.errors import EXIT_GATE_FAILED
from resnet_export.checks.verify import (
    GATES,
    KERNEL_GATE,
    RANDOM_WEIGHT_PLAN_GATES,
    Verification,
    VerificationError,
    compare,
    gate_failures,
)

from ..conftest import IMAGES
from ..test_cli import assert_one_line_error, run


def _logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((10, 5))


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_a_non_finite_value_fails_every_gate_by_name_with_its_count(bad):
    """One non-finite logit in 9 rows of 10, each the row's lowest, so no top-1 decision changes: every gate fails,
    the fused-vs-exact one included, and says how many values."""
    reference = _logits()
    candidate = reference.copy()
    lowest = reference.argmin(axis=1)
    candidate[np.arange(9), lowest[:9]] = bad
    metrics = compare(reference, candidate)
    assert metrics["nonfinite"] == 9 and (np.nanargmax(candidate, 1) == reference.argmax(1)).all()
    for gate in (*GATES.values(), *RANDOM_WEIGHT_PLAN_GATES.values(), KERNEL_GATE):
        assert "9 non-finite value(s) (NaN or Inf) in the outputs" in gate_failures(metrics, gate)
    assert gate_failures(compare(reference, reference), GATES["fp32"]) == []


def test_a_reference_with_non_finite_values_is_an_error_not_a_pass():
    reference = _logits()
    reference[3, 2] = np.nan
    with pytest.raises(VerificationError, match="reference's outputs hold 1 non-finite value"):
        compare(reference, _logits())


def test_a_plans_slack_is_one_distinct_input_never_fidelity():
    """A near-tie flipped by rounding (the two best logits 1e-4 apart, swapped) passes with a slack of one input
    and fails without; a candidate off in fidelity fails with the slack too."""
    reference = _logits()
    reference[0, :2] = [3.0, 3.0 - 1e-4]
    flipped = reference.copy()
    flipped[0, :2] = reference[0, 1::-1]
    metrics = compare(reference, flipped)
    assert metrics["top1_agreement"] == 0.9 and metrics["min_cosine"] > 0.99999
    assert gate_failures(metrics, GATES["fp32"], slack=1, distinct=10) == []
    assert gate_failures(metrics, GATES["fp32"]) == ["top-1 agreement 90.00% < 100.00%"]
    assert gate_failures(metrics, GATES["fp32"], slack=1, distinct=5) == []  # rows repeated: counted on inputs
    off = compare(reference, reference + np.eye(10, 5) * 2)
    assert any("min cosine" in f for f in gate_failures(off, GATES["fp32"], slack=1, distinct=10))


def emits_nan_in_the_lowest_logit(source, target) -> None:
    """``source`` with each row's lowest logit replaced by NaN: the top-1 decision of every row unchanged."""
    model = onnx.load(str(source))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_clean" if o == output else o for o in node.output]
    model.graph.initializer.extend([numpy_helper.from_array(np.array(np.nan, np.float32), "nan"),
                                    numpy_helper.from_array(np.array([1], np.int64), "axis")])
    model.graph.node.extend([
        helper.make_node("ReduceMin", [f"{output}_clean", "axis"], ["lowest"], keepdims=1),
        helper.make_node("Equal", [f"{output}_clean", "lowest"], ["is_lowest"]),
        helper.make_node("Where", ["is_lowest", "nan", f"{output}_clean"], [output])])
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def test_verify_fails_an_onnx_that_emits_nan_where_no_decision_changes(resnet18_onnx, tmp_path):
    doctored = tmp_path / "nan.onnx"
    emits_nan_in_the_lowest_logit(resnet18_onnx.path, doctored)
    model = ["--arch", "resnet18", "--num-classes", "5", "--input-size", "64"]
    result = run("verify", doctored, *model, "--images", IMAGES, "--precision", "fp32")
    assert_one_line_error(result, "non-finite value(s) (NaN or Inf) in the outputs", code=EXIT_GATE_FAILED)


def test_a_random_weight_plan_answering_other_inputs_fails_though_its_logits_look_alike():
    """A random-weight resnet50 (the toolkit's seeded initialisation, 224x224) answers every input with nearly the same
    logits, so rows answered for other inputs (a wrong binding, a wrong batch) pass FP16's cosine and relative
    error; the input-dependent part fails them at FP32 and FP16. Noise of TensorRT's FP16 size (relative 1e-3 of the largest
    logit) passes."""
    import torch

    from resnet_export.source.models import load_model

    model = load_model(arch="resnet50").module.eval()
    with torch.no_grad():
        reference = model(torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))).double().numpy()
    noise = np.random.default_rng(1).standard_normal(reference.shape) * 1e-3 * np.abs(reference).max()
    for precision in ("fp32", "fp16"):
        assert gate_failures(compare(reference, reference + noise * (precision == "fp16")),
                             RANDOM_WEIGHT_PLAN_GATES[precision]) == []
    for wrong in (np.roll(reference, 1, axis=0), np.repeat(reference[:1], 4, axis=0)):
        metrics = compare(reference, wrong)
        assert gate_failures(metrics, replace(RANDOM_WEIGHT_PLAN_GATES["fp16"], min_centered_cosine=None)) == []
        for precision in ("fp32", "fp16"):
            failures = gate_failures(metrics, RANDOM_WEIGHT_PLAN_GATES[precision])
            assert [f for f in failures if "input-dependent part" in f], (precision, failures)
    one_input = compare(reference[:1].repeat(3, 0), reference[:1].repeat(3, 0))
    assert one_input["min_centered_cosine"] is None
    assert "rows not told apart" in Verification(one_input, RANDOM_WEIGHT_PLAN_GATES["fp16"]).summary()
    assert "checked for collapse only" in Verification(one_input, RANDOM_WEIGHT_PLAN_GATES["int8"]).summary()


def test_the_one_flip_allowance_is_a_share_of_the_distinct_inputs():
    """8 recorded inputs, each repeated 4 times to fill an engine's batches: one input flipping its top-1 (4 rows) is
    within a trained plan's one-flip allowance; two inputs flipping are not, though 8 rows are still fewer than the
    rows compared. An allowance of one row, or of one whole flip at any count, would tell neither apart."""
    reference = np.repeat(_logits(), 4, axis=0)[:32]
    flipped = reference.copy()
    for row in range(8):  # rows 0-3: input 0, rows 4-7: input 1
        top = flipped[row].argmax()
        flipped[row, top] = flipped[row].min() - 1
    one, two = compare(reference, np.concatenate([flipped[:4], reference[4:]])), compare(reference, flipped)
    gate = replace(GATES["fp16"], min_cosine=None)  # top-1 alone (a flipped row also moves the cosine)
    assert gate_failures(one, gate, slack=1, distinct=8) == []
    assert any("top-1 agreement" in f for f in gate_failures(two, gate, slack=1, distinct=8))
    assert any("top-1 agreement" in f for f in gate_failures(one, gate))  # no slack: one flip fails the gate
