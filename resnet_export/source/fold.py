"""BatchNorm folding, in PyTorch (before export) and in ONNX (for files made elsewhere).

PyTorch: the dataflow comes from a ``torch.fx`` trace, so any Conv -> BatchNorm pair is found whatever
the attributes are called. A BatchNorm that cannot be folded is reported with the reason, never dropped.
ONNX: ``Conv -> BatchNormalization`` pairs whose parameters are initializers are merged.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import ModelError

if TYPE_CHECKING:
    from .models import LoadedModel


@dataclass
class FoldReport:
    """What a fold did: merged (conv, bn) pairs and the BatchNorms left, each with a reason."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    unfoldable: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report as manifest JSON: how many folded, which not and why."""
        return {
            "folded": len(self.folded),
            "unfoldable": [{"name": name, "reason": reason} for name, reason in self.unfoldable],
        }

    def summary(self) -> str:
        """One line for the terminal."""
        text = f"folded {len(self.folded)} BatchNorm"
        if self.unfoldable:
            text += "; NOT folded: " + ", ".join(f"{n} ({r})" for n, r in self.unfoldable)
        return text


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """Return an eval-mode copy of ``model`` with every Conv -> BatchNorm merged into the conv.

    The copy keeps the original classes and structure: each folded conv is replaced by the fused
    conv and its BatchNorm by ``nn.Identity``.
    """
    model = copy.deepcopy(model).eval()
    report = FoldReport()
    batchnorms = {name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not batchnorms:
        return model, report
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # user models with data-dependent control flow
        reason = f"model not traceable by torch.fx ({type(exc).__name__}); left to the ONNX-level fold"
        report.unfoldable = [(name, reason) for name in sorted(batchnorms)]
        return model, report

    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in batchnorms:
            continue
        reason = _why_not_foldable(model, node, calls)
        if reason:
            report.unfoldable.append((node.target, reason))
            continue
        conv_name = node.args[0].target
        fused = fuse_conv_bn_eval(model.get_submodule(conv_name), model.get_submodule(node.target))
        model.set_submodule(conv_name, fused)
        model.set_submodule(node.target, nn.Identity())
        report.folded.append((conv_name, node.target))
    return model, report


def _why_not_foldable(model: nn.Module, node, calls: Counter) -> str | None:
    bn = model.get_submodule(node.target)
    source = node.args[0] if node.args else None
    if not isinstance(source, torch.fx.Node) or source.op != "call_module":
        return f"input is not a convolution ({getattr(source, 'name', source)})"
    conv = model.get_submodule(source.target)
    if not isinstance(conv, _ConvNd) or conv.transposed:
        return f"input is {type(conv).__name__} '{source.target}', not a convolution"
    if len(source.users) > 1:
        return f"output of conv '{source.target}' also feeds other operations"
    if calls[source.target] > 1 or calls[node.target] > 1:
        return "module is called more than once in forward"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False)"
    return None


# --------------------------------------------------------------------------- ONNX level


def to_inference_mode(model) -> int:
    """Turn training-mode ``BatchNormalization`` nodes of an ``onnx.ModelProto`` into inference mode.

    Their unused running-statistics outputs are dropped, so they normalise with the stored running
    statistics, as the deployed model must. Returns how many nodes changed; in place.
    """
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    changed = 0
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or not _is_training_mode(bn):
            continue
        if any(name in used for name in bn.output[1:]):
            continue  # its running statistics feed something: leave it, the fold reports it
        del bn.output[1:]
        for attr in list(bn.attribute):
            if attr.name in ("training_mode", "momentum"):
                bn.attribute.remove(attr)
        changed += 1
    return changed


def fold_onnx_batchnorm(model) -> FoldReport:
    """Merge ``Conv -> BatchNormalization`` pairs of an ``onnx.ModelProto`` in place; return a report."""
    from onnx import numpy_helper

    graph = model.graph
    _bypass_constant_identities(graph)
    inits = {init.name: init for init in graph.initializer}
    consumers = Counter(name for node in graph.node for name in node.input)
    consumers.update(out.name for out in graph.output)
    producers = {out: node for node in graph.node for out in node.output}
    report = FoldReport()
    removed = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization":
            continue
        conv = producers.get(bn.input[0])
        reason = _why_not_foldable_onnx(bn, conv, inits, consumers)
        if reason:
            report.unfoldable.append((bn.name or bn.output[0], reason))
            continue
        scale, beta, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        weight = numpy_helper.to_array(inits[conv.input[1]])
        factor = scale / np.sqrt(var + eps)
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else 0.0
        new_weight = (weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
        new_bias = ((bias - mean) * factor + beta).astype(weight.dtype)
        stem = conv.name or conv.output[0]
        graph.initializer.extend(
            [numpy_helper.from_array(new_weight, f"{stem}_folded_W"), numpy_helper.from_array(new_bias, f"{stem}_folded_B")]
        )
        del conv.input[1:]
        conv.input.extend([f"{stem}_folded_W", f"{stem}_folded_B"])
        conv.output[0] = bn.output[0]
        removed.append(bn)
        report.folded.append((conv.name, bn.name))
    for bn in removed:
        graph.node.remove(bn)
    _drop_unused_initializers(graph)
    return report


def _is_training_mode(bn) -> bool:
    return len([o for o in bn.output if o]) > 1 or any(a.name == "training_mode" and a.i for a in bn.attribute)


def _bypass_constant_identities(graph) -> None:
    """Point consumers of ``Identity(initializer)`` at the initializer (TorchScript exports make these)."""
    inits = {init.name for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    alias = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]


def _why_not_foldable_onnx(bn, conv, inits, consumers) -> str | None:
    if _is_training_mode(bn):
        return "training-mode BatchNormalization whose running statistics are used"
    if conv is None or conv.op_type != "Conv":
        return f"input is not a Conv ({conv.op_type if conv else 'graph input'})"
    if consumers[conv.output[0]] > 1:
        return f"output of Conv '{conv.name}' also feeds other nodes"
    params = list(conv.input[1:]) + list(bn.input[1:5])
    if not all(name in inits for name in params):
        return "parameters are not constant initializers"
    return None


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    used.update(inp.name for inp in graph.input)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


#: Largest relative error (to max |logit|) the PyTorch-level fold may introduce.
FOLD_TOLERANCE = 1e-4


def checked_fold(loaded: "LoadedModel", seed: int = 0) -> tuple[nn.Module, FoldReport, float]:
    """Fold BatchNorm and check the folded module against the original; returns the relative error."""
    from ..data import random_inputs
    from .models import run_forward

    example = torch.from_numpy(random_inputs(loaded.preprocessing, 2, seed).array)
    reference = run_forward(loaded.module, example)
    folded, report = fold_batchnorm(loaded.module)
    result = run_forward(folded, example)
    error = float((result - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    if not error <= FOLD_TOLERANCE:
        raise ModelError(f"BatchNorm folding changed the outputs (relative error {error:.3g} > {FOLD_TOLERANCE})")
    return folded, report, error
