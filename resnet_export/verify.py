"""Compare a runner with the PyTorch reference: metrics and pass/fail gates."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import Inputs
from .errors import GateFailed, ResnetExportError
from .runners import Runner


class VerificationError(ResnetExportError):
    """A comparison that cannot be made (a reference with non-finite outputs)."""


@dataclass(frozen=True)
class Gate:
    """Thresholds a candidate must meet against the reference (None: not gated)."""

    min_top1_agreement: float
    min_cosine: float | None = None
    max_accuracy_drop: float | None = None  # in points, only checked when labels exist
    max_rel_err: float | None = None  # largest |difference| over the largest |reference|
    min_centered_cosine: float | None = None  # cosine of the input-dependent parts (``compare``)


#: INT8 also gates output fidelity: a saturated artifact keeps most top-1 decisions while its logits
#: collapse (min cosine 0.24-0.62 measured); healthy INT8 artifacts of trained ResNets stay above 0.99
#: (README, "INT8 on every CPU").
GATES = {
    "fp32": Gate(min_top1_agreement=1.0, min_cosine=0.99999),
    "fp16": Gate(min_top1_agreement=0.99, min_cosine=0.999),
    "int8": Gate(min_top1_agreement=0.97, min_cosine=0.95, max_accuracy_drop=1.0),
    # PyTorch's BF16 rows (no BF16 artifact is made): 8 mantissa bits, FP16's cosine, a wider top-1 margin
    "bf16": Gate(min_top1_agreement=0.97, min_cosine=0.999),
}
#: A plan of a model with random weights, gated on fidelity alone: its logits are near-ties everywhere, and a real
#: engine rounds differently from ONNX Runtime (other kernels, accumulation orders, formats), so one input's flipped
#: top-1 is noise, not a fault. The limits hold TensorRT-sized rounding (FP32: 1e-6 relative; FP16: 1e-3; INT8: one
#: quantization step of the logits) with a wide margin. A random-weight ResNet answers every input with nearly the
#: same logits (the logits of two different inputs: cosine 0.9987 for resnet18, 0.99985 for resnet50), so a wrong
#: binding or a wrong batch passes cosine and relative error; the input-dependent parts (``min_centered_cosine``)
#: tell it: -0.2 to -0.9 for another input's row, 0.99991 / 0.9986 / 0.9917 for the FP16 ONNX of a random resnet18 /
#: resnet50 / resnet152 on ONNX Runtime. For INT8 no gate can tell: quantization noise exceeds the input-dependent
#: part (centered cosine 0.48 and -0.36 for healthy INT8 ONNX of a random resnet18 and resnet50), so a random-weight
#: INT8 plan is checked for collapse only; its bindings are those of the FP32 and FP16 plans the same code builds.
RANDOM_WEIGHT_PLAN_GATES = {
    "fp32": Gate(min_top1_agreement=0.0, min_cosine=0.9999, max_rel_err=1e-3, min_centered_cosine=0.99),
    "fp16": Gate(min_top1_agreement=0.0, min_cosine=0.999, max_rel_err=0.05, min_centered_cosine=0.9),
    "int8": Gate(min_top1_agreement=0.0, min_cosine=0.95),
    # BF16 PyTorch of a random resnet50 on the CPU: cosine 0.999985, relative error 0.0048, input-dependent part
    # 0.885 (FP16: 0.9975); another input's row gives -0.2 to -0.9
    "bf16": Gate(min_top1_agreement=0.0, min_cosine=0.999, max_rel_err=0.05, min_centered_cosine=0.5),
}


def plan_gate(precision: str, random_weights: bool, tf32: bool = False) -> Gate:
    """The gate an artifact (a plan, a precision ONNX, a benchmark row) of ``precision`` must meet against PyTorch
    FP32: the one place gates are chosen by what the weights can show.

    Trained weights: the precision's gate (top-1 and accuracy mean something). Random weights: fidelity alone
    (``RANDOM_WEIGHT_PLAN_GATES``). An FP32 plan built with TF32 computes its convolutions with 10 mantissa
    bits, as FP16 does: it gets FP16's gate.
    """
    precision = "fp16" if precision == "fp32" and tf32 else precision
    return (RANDOM_WEIGHT_PLAN_GATES if random_weights else GATES)[precision]


#: An INT8 graph as ONNX Runtime's fused kernels run it on this CPU, against the same graph run exactly
#: (graph optimizations off): two runs of one graph, judged by their outputs' closeness, not by top-1 (a near-tie
#: flips on rounding alone: one flip in 7 rows of a random resnet50 at min cosine 0.9992). Healthy: min cosine
#: >= 0.998; saturated: 0.24-0.65; the trained ResNet-18 whose top-1 survived saturation: 0.982.
KERNEL_GATE = Gate(min_top1_agreement=0.0, min_cosine=0.99)


@dataclass
class Verification:
    """The metrics of one comparison and the gate failures (empty when it passed)."""

    metrics: dict
    gate: Gate
    failures: list[str] = field(default_factory=list)
    inputs: str = ""
    batch_sizes: list[int] = field(default_factory=list)
    #: The fused run against the exact run of the same graph on this CPU (INT8 on ONNX Runtime only).
    kernels: dict | None = None
    #: What the candidate was compared with, in words ("PyTorch FP32 logits recorded at quantize time, 16 images").
    reference: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures

    def raise_if_failed(self, what: str, note: str = "") -> None:
        """Raise GateFailed ``what: failures note`` when a threshold was missed."""
        if self.failures:
            raise GateFailed(f"{what}: {'; '.join(self.failures)}{note}")

    def to_dict(self) -> dict:
        """The verification as manifest JSON."""
        from .cpu import cpu_info

        return {
            "passed": self.passed,
            "failures": self.failures,
            "gate": self.gate.__dict__,
            "inputs": self.inputs,
            "batch_sizes": self.batch_sizes,
            "metrics": self.metrics,
            "kernels": self.kernels,
            "reference": self.reference,
            "cpu": cpu_info(),
        }

    def summary(self) -> str:
        """The headline metrics in one line."""
        m = self.metrics
        text = (
            f"top-1 agreement {m['top1_agreement']:.1%}, top-5 {m['top5_agreement']:.1%}, "
            f"min cosine {m['min_cosine']:.7f}, max abs err {m['max_abs_err']:.3g} "
            f"(rel {m['max_rel_err']:.3g})"
        )
        if "accuracy_candidate" in m:
            text += f", accuracy {m['accuracy_candidate']:.1%} (reference {m['accuracy_reference']:.1%})"
        if self.gate.min_centered_cosine is not None and m.get("min_centered_cosine") is None:
            text += "; rows not told apart (one distinct input: a wrong binding would pass)"
        if self.gate == RANDOM_WEIGHT_PLAN_GATES["int8"]:
            text += "; random-weight INT8: checked for collapse only (quantization noise hides which input a row answers)"
        if self.kernels:
            text += f"; fused vs exact Q/DQ on this CPU: min cosine {self.kernels['metrics']['min_cosine']:.5f}"
        return text


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Metrics of ``candidate`` logits against ``reference`` logits, both ``(N, classes)``.

    ``nonfinite`` counts the candidate's NaN and Inf values (every gate fails on any); a reference with any is an
    error, since nothing can be measured against it. ``min_centered_cosine`` compares the rows less the reference's
    mean row, the part of the logits that depends on the input (None when the reference rows do not differ).
    """
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    if not np.isfinite(reference).all():
        raise VerificationError(f"the reference's outputs hold {np.count_nonzero(~np.isfinite(reference))} non-finite "
                                "value(s) (NaN or Inf): nothing can be compared with them")
    diff = np.abs(reference - candidate)
    mean_row = reference.mean(axis=0)
    centered, moved = reference - mean_row, candidate - mean_row
    varied = np.linalg.norm(centered, axis=1) > 1e-9 * max(np.abs(reference).max(), 1e-30)
    with np.errstate(invalid="ignore"):  # a non-finite candidate gives NaN here; the gates fail it by its count
        cosine = _row_cosines(reference, candidate)
        centered_cosine = _row_cosines(centered[varied], moved[varied])
    k = min(5, reference.shape[1])
    top_ref = np.argsort(-reference, axis=1)[:, :k]
    top_cand = np.argsort(-candidate, axis=1)[:, :k]
    p, q = _softmax(reference), _softmax(candidate)
    kl = (p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30)))).sum(axis=1)
    metrics = {
        "samples": int(reference.shape[0]),
        "nonfinite": int(np.count_nonzero(~np.isfinite(candidate))),
        "max_abs_err": float(diff.max()),
        "mean_abs_err": float(diff.mean()),
        "max_rel_err": float(diff.max() / max(np.abs(reference).max(), 1e-30)),
        "min_cosine": float(cosine.min()),
        "min_centered_cosine": float(centered_cosine.min()) if varied.any() else None,
        "top1_agreement": float((top_ref[:, 0] == top_cand[:, 0]).mean()),
        "top5_agreement": float(np.mean([set(a) == set(b) for a, b in zip(top_ref, top_cand)])),
        "kl_divergence": float(kl.mean()),
    }
    if labels is not None:
        metrics["accuracy_reference"] = float((top_ref[:, 0] == labels).mean())
        metrics["accuracy_candidate"] = float((top_cand[:, 0] == labels).mean())
        metrics["accuracy_drop_points"] = 100 * (metrics["accuracy_reference"] - metrics["accuracy_candidate"])
    return metrics


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine of each row of ``a`` with the same row of ``b``."""
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def gate_failures(metrics: dict, gate: Gate, slack: int = 0, distinct: int | None = None) -> list[str]:
    """Which thresholds of ``gate`` the metrics miss, each as a readable phrase.

    ``slack``: that many inputs may flip their top-1 (and their accuracy) beyond the thresholds, for a candidate
    that rounds differently from the reference by design (a real engine on a few recorded inputs); the fidelity
    thresholds (cosine, relative error) take no slack. ``distinct``: how many different inputs the metrics' rows
    hold (rows repeat when inputs were repeated to fill an engine's batches).
    """
    failures = []
    if metrics.get("nonfinite"):
        failures.append(f"{metrics['nonfinite']} non-finite value(s) (NaN or Inf) in the outputs")
    allowed = slack / (distinct or metrics["samples"])
    if metrics["top1_agreement"] < gate.min_top1_agreement - allowed:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.2%} < {gate.min_top1_agreement:.2%}"
                        + (f" (less {slack} input's flip)" if slack else ""))
    if gate.min_cosine is not None and metrics["min_cosine"] < gate.min_cosine:
        failures.append(f"min cosine {metrics['min_cosine']:.6f} < {gate.min_cosine}")
    if gate.max_rel_err is not None and metrics["max_rel_err"] > gate.max_rel_err:
        failures.append(f"max relative error {metrics['max_rel_err']:.3g} > {gate.max_rel_err}")
    centered = metrics.get("min_centered_cosine")
    if gate.min_centered_cosine is not None and centered is not None and centered < gate.min_centered_cosine:
        failures.append(f"min cosine of the input-dependent part {centered:.4f} < {gate.min_centered_cosine} "
                        "(rows answer other inputs: a wrong binding or batch?)")
    drop = metrics.get("accuracy_drop_points")
    if gate.max_accuracy_drop is not None and drop is not None and drop > gate.max_accuracy_drop + 100 * allowed:
        failures.append(f"accuracy drop {drop:.2f} points > {gate.max_accuracy_drop}")
    return failures


def batch_plan(count: int, fixed_batch: int | None, max_batch: int = 8, min_batch: int = 1) -> list[int]:
    """Batch sizes covering ``count`` samples: ``min_batch`` first, then batches up to ``max_batch``.

    Two samples run as one batch of 2. Every batch after the first has at least 2 rows (the dynamic
    axis) and none leaves ``[min_batch, max_batch]``: a short last batch is padded (run_batches
    repeats its last sample). A model with a fixed batch runs batches of exactly that size.
    """
    if fixed_batch:
        return [fixed_batch] * -(-count // fixed_batch)
    if min_batch == max_batch:
        return [max_batch] * -(-count // max_batch)
    if count <= 2 and min_batch == 1:
        return [count]
    rest = max(count - min_batch, 0)
    sizes = [min_batch] + [max_batch] * (rest // max_batch)
    if rest % max_batch:
        sizes.append(max(rest % max_batch, min_batch, 2))
    return sizes


def run_batches(runner: Runner, array: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Run ``array`` through ``runner`` in batches of ``sizes``; pads a short last batch by repetition."""
    outputs, start = [], 0
    for size in sizes:
        if start >= len(array):
            break
        chunk = array[start:start + size]
        real = len(chunk)
        if real < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
        outputs.append(runner.infer(chunk)[:real])
        start += real
    return np.concatenate(outputs)


def covering(inputs: Inputs, sizes: list[int], expected: np.ndarray | None = None) -> tuple[Inputs, np.ndarray | None]:
    """``inputs`` (and ``expected`` logits) repeated in turn until each batch of ``sizes`` is full, so that every
    batch size runs even with fewer samples (an engine's profile maximum with a few recorded inputs)."""
    index = np.arange(max(sum(sizes), len(inputs.array))) % len(inputs.array)
    labels = None if inputs.labels is None else inputs.labels[index]
    described = inputs.description if len(index) == len(inputs.array) else (
        f"{inputs.description}, repeated to fill batches {','.join(map(str, sizes))}")
    return (Inputs(inputs.array[index], labels, described, inputs.labels_by_order),
            None if expected is None else expected[index])


def verify(
    reference: Runner | np.ndarray,
    candidate: Runner,
    inputs: Inputs,
    gate: Gate,
    fixed_batch: int | None = None,
    sizes: list[int] | None = None,
    exact: Runner | None = None,
    cover: bool = False,
    described_reference: str = "",
    slack: int = 0,
) -> Verification:
    """Run both runners on the same inputs, compute the metrics and check them against ``gate``.

    ``reference`` is a runner or the reference logits of ``inputs`` (recorded ones). ``sizes`` overrides the
    batch plan (an engine's profile batches); with ``cover`` the inputs repeat until every batch of ``sizes``
    runs full. ``exact`` is the candidate's graph run as written (``OrtRunner(path, exact=True)``): the
    candidate must also match it (``KERNEL_GATE``), else its fused INT8 kernels do not compute the graph on
    this CPU. ``described_reference`` says in words what ``reference`` is; ``slack`` as for ``gate_failures``.
    """
    sizes = sizes or batch_plan(len(inputs.array), fixed_batch)
    expected = reference if isinstance(reference, np.ndarray) else None
    distinct = len(inputs.array)
    if cover:
        inputs, expected = covering(inputs, sizes, expected)
    cand = run_batches(candidate, inputs.array, sizes)
    ref = expected[:len(cand)] if expected is not None else run_batches(reference, inputs.array, sizes)
    labels = inputs.labels_for(ref.shape[1])
    metrics = compare(ref, cand, None if labels is None else labels[:len(ref)])
    described = inputs.description
    if len(ref) < len(inputs.array):  # say what was compared, not what was loaded
        described = f"the first {len(ref)} of {described}"
    failures = gate_failures(metrics, gate, slack, min(distinct, len(ref)))
    kernels = None
    if exact is not None:
        kernel_metrics = compare(run_batches(exact, inputs.array, sizes), cand)
        kernel_failures = gate_failures(kernel_metrics, KERNEL_GATE)
        kernels = {"passed": not kernel_failures, "gate": KERNEL_GATE.__dict__, "metrics": kernel_metrics}
        if kernel_failures:
            failures.append(kernel_gap_message(kernel_failures))
    return Verification(metrics, gate, failures, described, sizes, kernels, described_reference)


def kernel_gap_message(failures: list[str]) -> str:
    """The failure phrase for fused INT8 kernels that differ from the exact run, naming this CPU."""
    from .cpu import cpu_info, describe_cpu, exact_u8s8

    info = cpu_info()
    cause = ("saturation: its u8s8 kernels add pairs of products in 16 bits (measured); quantize with `cpu_form` "
             "portable (7-bit weights)" if not exact_u8s8(info)
             else "its integer kernels do not compute the Q/DQ graph as written")
    return (f"ONNX Runtime's fused INT8 run differs from the exact run of the same graph on {describe_cpu(info)} "
            f"({'; '.join(failures)}): {cause}")
