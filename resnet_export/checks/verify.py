"""Compare a runner with the PyTorch reference: metrics and pass/fail gates."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..data import Batch, DataError, ImageFolder, Inputs, warn_skipped
from ..errors import GateFailed, ResnetExportError
from ..image_stream import plan
from ..progress import task
from ..runtime.runners import Runner
from .statistics import accuracy_statistics, agreement_interval, describe_statistics, per_class_drops
from .results import ResultsFile, Scored
from ..runtime.batches import batch_plan, run_batches


log = logging.getLogger(__name__)


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
        from ..cpu import cpu_info

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

    @property
    def batches(self) -> str:
        """The batch sizes run, runs of one size counted: ``1,8x6249,3``."""
        runs: list[list[int]] = []
        for size in self.batch_sizes:
            if runs and runs[-1][0] == size:
                runs[-1][1] += 1
            else:
                runs.append([size, 1])
        return ",".join(f"{size}x{count}" if count > 2 else ",".join([str(size)] * count) for size, count in runs)

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
        statistics = describe_statistics(m) if m.get("samples", 0) > 1 else ""
        if statistics:
            text += f"; {statistics}"
        if self.gate.min_centered_cosine is not None and m.get("min_centered_cosine") is None:
            text += "; rows not told apart (one distinct input: a wrong binding would pass)"
        if self.gate == RANDOM_WEIGHT_PLAN_GATES["int8"]:
            text += "; random-weight INT8: checked for collapse only (quantization noise hides which input a row answers)"
        if self.kernels:
            checked = self.kernels["metrics"]["samples"]
            text += (f"; fused vs exact Q/DQ on this CPU: min cosine {self.kernels['metrics']['min_cosine']:.5f}"
                     + (f" (first {checked} inputs)" if checked < m["samples"] else ""))
        return text


#: Images the exact run of an INT8 graph checks the fused kernels on (``verify``'s ``exact``): a property of this
#: CPU's kernels, shown by the first batches (saturation drops the min cosine to 0.24-0.65 within a few images);
#: on a validation set the exact run, slower than both runners together, would otherwise set the pace.
KERNEL_ROWS = 256
#: Rows whose logits are kept for the input-dependent cosine (``compare``): its mean row needs them all at once.
HEAD_ROWS = 64


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def row_stats(reference: np.ndarray, candidate: np.ndarray) -> dict[str, np.ndarray]:
    """The few numbers per row that ``metrics_from`` reduces: each row's cosine, largest and summed absolute
    difference, largest reference magnitude, non-finite count, KL divergence, and both top-5s.

    A reference with any NaN or Inf is an error, since nothing can be measured against it.
    """
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    if not np.isfinite(reference).all():
        raise VerificationError(f"the reference's outputs hold {np.count_nonzero(~np.isfinite(reference))} non-finite "
                                "value(s) (NaN or Inf): nothing can be compared with them")
    diff = np.abs(reference - candidate)
    with np.errstate(invalid="ignore"):  # a non-finite candidate gives NaN here; the gates fail it by its count
        cosine = _row_cosines(reference, candidate)
    k = min(5, reference.shape[1])
    p, q = _softmax(reference), _softmax(candidate)
    return {
        "cosine": cosine,
        "max_abs": diff.max(axis=1),
        "sum_abs": diff.sum(axis=1),
        "ref_absmax": np.abs(reference).max(axis=1),
        "nonfinite": np.count_nonzero(~np.isfinite(candidate), axis=1),
        "kl": (p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30)))).sum(axis=1),
        "top_ref": np.argsort(-reference, axis=1, kind="stable")[:, :k],
        "top_cand": np.argsort(-candidate, axis=1, kind="stable")[:, :k],
        "classes": np.full(len(reference), reference.shape[1]),
    }


def _sum(values: np.ndarray) -> float:
    """An exact sum (the same whatever order the rows came in), NaN or Inf as numpy gives them."""
    return math.fsum(values) if np.isfinite(values).all() else float(np.sum(values))


def metrics_from(stats: dict[str, np.ndarray], labels: np.ndarray | None = None,
                 head: tuple[np.ndarray, np.ndarray] | None = None, names: list[str] | None = None) -> dict:
    """The metrics of rows reduced by ``row_stats`` (concatenated in any grouping; the figures do not depend on it).

    ``head``: the reference and candidate logits of the first rows (up to ``HEAD_ROWS``), for
    ``min_centered_cosine``: their rows less the reference's mean row, the part of the logits that depends on the
    input (None when the reference rows do not differ). ``labels`` (one per row) add the accuracies and the
    reviewer's statistics (``statistics.accuracy_statistics``, the classes that fell most, named by ``names``);
    without them, top-1 agreement's interval.
    """
    n = len(stats["cosine"])
    top_ref, top_cand = stats["top_ref"], stats["top_cand"]
    agree = top_ref[:, 0] == top_cand[:, 0]
    max_abs = float(stats["max_abs"].max())
    metrics = {
        "samples": int(n),
        "nonfinite": int(stats["nonfinite"].sum()),
        "max_abs_err": max_abs,
        "mean_abs_err": _sum(stats["sum_abs"]) / (n * int(stats["classes"][0])),
        "max_rel_err": float(max_abs / max(stats["ref_absmax"].max(), 1e-30)),
        "min_cosine": float(stats["cosine"].min()),
        "min_centered_cosine": _centered_cosine(*head) if head is not None else None,
        "top1_agreement": float(agree.mean()),
        "top5_agreement": float(np.all(np.sort(top_ref, axis=1) == np.sort(top_cand, axis=1), axis=1).mean()),
        "kl_divergence": _sum(stats["kl"]) / n,
    }
    if labels is None:
        metrics["statistics"] = {"top1_agreement_ci95": agreement_interval(int(agree.sum()), n)}
        return metrics
    ref_right, cand_right = top_ref[:, 0] == labels, top_cand[:, 0] == labels
    metrics["accuracy_reference"] = float(ref_right.mean())
    metrics["accuracy_candidate"] = float(cand_right.mean())
    metrics["accuracy_drop_points"] = 100 * (metrics["accuracy_reference"] - metrics["accuracy_candidate"])
    metrics["statistics"] = {**accuracy_statistics(ref_right, cand_right),
                             "top1_agreement_ci95": agreement_interval(int(agree.sum()), n),
                             "classes_fallen_most": per_class_drops(labels, ref_right, cand_right, names)}
    return metrics


def _centered_cosine(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """The least cosine of the rows' input-dependent parts (less the reference's mean row); None when no row
    differs from the mean."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    mean_row = reference.mean(axis=0)
    centered, moved = reference - mean_row, candidate - mean_row
    varied = np.linalg.norm(centered, axis=1) > 1e-9 * max(np.abs(reference).max(), 1e-30)
    if not varied.any():
        return None
    with np.errstate(invalid="ignore"):
        return float(_row_cosines(centered[varied], moved[varied]).min())


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Metrics of ``candidate`` logits against ``reference`` logits, both ``(N, classes)`` (``metrics_from``).

    ``nonfinite`` counts the candidate's NaN and Inf values (every gate fails on any); a reference with any is an
    error. ``min_centered_cosine`` is taken over the first ``HEAD_ROWS`` rows.
    """
    stats = row_stats(reference, candidate)
    return metrics_from(stats, labels, (reference[:HEAD_ROWS], candidate[:HEAD_ROWS]))


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


def covering(inputs: Inputs, sizes: list[int], expected: np.ndarray | None = None) -> tuple[Inputs, np.ndarray | None]:
    """``inputs`` (and ``expected`` logits) repeated in turn until each batch of ``sizes`` is full, so that every
    batch size runs even with fewer samples (an engine's profile maximum with a few recorded inputs)."""
    index = np.arange(max(sum(sizes), len(inputs.array))) % len(inputs.array)
    labels = None if inputs.labels is None else inputs.labels[index]
    described = inputs.description if len(index) == len(inputs.array) else (
        f"{inputs.description}, repeated to fill batches {','.join(map(str, sizes))}")
    return (Inputs(inputs.array[index], labels, described, inputs.labels_by_order),
            None if expected is None else expected[index])


def score_batch(reference: Runner | None, candidate: Runner, batch: Batch, exact: Runner | None = None,
                expected: np.ndarray | None = None) -> Scored:
    """One block run through the candidate, then the reference (or its ``expected`` logits, indexed by position),
    each over all the block's batches, and reduced to ``row_stats``; a short batch is padded (``run_batches``)."""
    if batch.array is None or not len(batch.positions):
        return Scored(batch.start, [], None, failures=batch.failures)
    cand = run_batches(candidate, batch.array, list(batch.sizes))
    ref = expected[batch.positions] if expected is not None else run_batches(reference, batch.array, list(batch.sizes))
    checks_kernels = exact is not None and batch.start < KERNEL_ROWS
    kernel = row_stats(run_batches(exact, batch.array, list(batch.sizes)), cand) if checks_kernels else None
    first = sum(p < HEAD_ROWS for p in batch.positions)
    head = (ref[:first], cand[:first]) if first else None
    return Scored(batch.start, list(batch.positions), row_stats(ref, cand), batch.labels, kernel, head, batch.failures)


def merged(parts: list[Scored]) -> Scored:
    """The batches' rows as one, in position order."""
    parts = sorted(parts, key=lambda s: s.start)
    rows = [s for s in parts if s.stats is not None]
    failures = [f for s in parts for f in s.failures]
    if not rows:
        return Scored(0, [], None, failures=failures)

    def joined(pick):
        values = [v for v in map(pick, rows) if v is not None]
        return {k: np.concatenate([v[k] for v in values]) for k in values[0]} if values else None

    heads = [s.head for s in rows if s.head is not None]
    return Scored(0, [p for s in rows for p in s.positions], joined(lambda s: s.stats),
                  None if rows[0].labels is None else np.concatenate([s.labels for s in rows]),
                  joined(lambda s: s.kernel),
                  (np.concatenate([h[0] for h in heads]), np.concatenate([h[1] for h in heads])) if heads else None,
                  failures)


def verify(
    reference: Runner | np.ndarray | None,
    candidate: Runner,
    inputs: Inputs | ImageFolder,
    gate: Gate,
    fixed_batch: int | None = None,
    sizes: list[int] | None = None,
    exact: Runner | None = None,
    cover: bool = False,
    described_reference: str = "",
    slack: int = 0,
    results: ResultsFile | None = None,
    scorer: Callable[[list[tuple[int, tuple[int, ...]]]], Iterator[Scored]] | None = None,
) -> Verification:
    """Run both runners on the same inputs batch by batch, reduce each batch to per-row numbers, then compute the
    metrics and check them against ``gate``.

    ``inputs``: in memory, or an image folder decoded as it runs (memory flat in the number of images).
    ``reference`` is a runner or the reference logits of ``inputs`` (recorded ones). ``sizes`` overrides the
    batch plan (an engine's profile batches); with ``cover`` the inputs repeat until every batch of ``sizes``
    runs full. ``exact`` is the candidate's graph run as written (``OrtRunner(path, exact=True)``): the
    candidate must also match it (``KERNEL_GATE``), else its fused INT8 kernels do not compute the graph on
    this CPU (checked on the first ``KERNEL_ROWS`` images). ``described_reference`` says in words what
    ``reference`` is; ``slack`` as for ``gate_failures``.
    ``results`` streams per-image results and holds the batches an interrupted run finished; ``scorer`` scores
    the batches elsewhere (``checks.on_ray``), else they are scored here.
    """
    expected = reference if isinstance(reference, np.ndarray) else None
    distinct = len(inputs)
    if cover and isinstance(inputs, ImageFolder) and len(inputs) >= sum(sizes):  # every size runs, the rest at the max
        sizes = sizes + [sizes[-1]] * -(-(len(inputs) - sum(sizes)) // sizes[-1])
    elif cover:
        inputs, expected = covering(inputs if isinstance(inputs, Inputs) else inputs.load(), sizes, expected)
    sizes = sizes or batch_plan(len(inputs), fixed_batch)
    batches = [b for b in plan(sizes) if b[0] < len(inputs)]
    done = results.open(batches, len(inputs)) if results else {}
    parts = list(done.values())
    todo = [b for b in batches if b[0] not in done]
    paths = getattr(inputs, "paths", None)
    scored = scorer(todo) if scorer else (score_batch(reference, candidate, b, exact, expected)
                                          for b in inputs.batches(todo))
    with task(log, f"Comparing on {inputs.description}", len(inputs), done=False) as advance:
        advance(sum(len(s.positions) + len(s.failures) for s in parts))
        for part in scored:
            if results:
                results.write(part, paths)
            parts.append(part)
            advance(len(part.positions) + len(part.failures))
    rows = merged(parts)
    if rows.stats is None:
        raise DataError(f"no readable image among {len(inputs)} files under {getattr(inputs, 'root', '')}")
    warn_skipped([text for _, text in rows.failures], len(inputs))
    if results:
        results.finish()
    classes = int(rows.stats["classes"][0])
    labels = rows.labels if inputs.labels_for(classes) is not None else None
    names = getattr(getattr(inputs, "spec", None), "class_names", None)
    metrics = metrics_from(rows.stats, labels, rows.head, names)
    described = inputs.description
    compared = len(rows.positions)
    if rows.failures:
        described = f"{compared} readable of {described}"
    elif compared < len(inputs):  # say what was compared, not what was loaded
        described = f"the first {compared} of {described}"
    failures = gate_failures(metrics, gate, slack, min(distinct, compared))
    kernels = None
    if exact is not None:
        kernel_metrics = metrics_from(rows.kernel)
        kernel_failures = gate_failures(kernel_metrics, KERNEL_GATE)
        kernels = {"passed": not kernel_failures, "gate": KERNEL_GATE.__dict__, "metrics": kernel_metrics}
        if kernel_failures:
            failures.append(kernel_gap_message(kernel_failures))
    return Verification(metrics, gate, failures, described, sizes, kernels, described_reference)


def kernel_gap_message(failures: list[str]) -> str:
    """The failure phrase for fused INT8 kernels that differ from the exact run, naming this CPU."""
    from ..cpu import cpu_info, describe_cpu, exact_u8s8

    info = cpu_info()
    cause = ("saturation: its u8s8 kernels add pairs of products in 16 bits (measured); quantize with `cpu_form` "
             "portable (7-bit weights)" if not exact_u8s8(info)
             else "its integer kernels do not compute the Q/DQ graph as written")
    return (f"ONNX Runtime's fused INT8 run differs from the exact run of the same graph on {describe_cpu(info)} "
            f"({'; '.join(failures)}): {cause}")
