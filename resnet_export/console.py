"""The command line's terminal: rich progress for the library's tasks, its log lines on stderr.

stdout stays free for results (``list`` tables, summary lines). Messages name the library's
parameters in backticks; here they become the command line's flags.
"""

from __future__ import annotations

import logging
import re

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn

console = Console(stderr=True, highlight=False)

#: Library parameter -> the flag that sets it, where the two names differ beyond ``_`` -> ``-``.
FLAGS = {"factory": "--model", "calib": "--calib DIR", "images": "--images DIR", "cpu_form": "--cpu"}


def as_flags(text: str) -> str:
    """Replace the backticked parameter names of a library message with command-line flags."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m[1], "--" + m[1].replace("_", "-")), text)


class RichListener:
    """Draws the library's tasks: a spinner for open-ended ones, a bar for counted ones (nested ok)."""

    def __init__(self):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TaskProgressColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.tasks: list[int] = []

    def start(self, description: str, total: int | None) -> None:
        if not self.tasks:
            self.progress.start()
        self.tasks.append(self.progress.add_task(description + " ...", total=total))

    def advance(self, steps: int = 1) -> None:
        if self.tasks:
            self.progress.advance(self.tasks[-1], steps)

    def end(self) -> None:
        self.progress.remove_task(self.tasks.pop())
        if not self.tasks:
            self.progress.stop()


class RichLogHandler(logging.Handler):
    """The library's log records as lines on stderr: ``Warning: ...`` for warnings, plain for info."""

    def emit(self, record: logging.LogRecord) -> None:
        text = as_flags(record.getMessage())
        if record.levelno >= logging.WARNING:
            console.print(f"[yellow]Warning:[/yellow] {escape(text)}", soft_wrap=True)
        else:
            console.print(text, soft_wrap=True, markup=False)


def table(title: str, *columns: str):
    """A rich table titled ``title`` with these columns."""
    from rich.table import Table

    grid = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        grid.add_column(column)
    return grid


def print_description(info: dict) -> None:
    """``inspect``'s report for a person: I/O, precision, preprocessing, verification, machines, op mix."""
    from .cpu import describe_cpu
    from .preprocessing import Preprocessing

    out = Console(highlight=False)  # stdout: the report is the command's result
    manifest = info.get("manifest") or {}

    kind = "TensorRT plan" if "engine" in info else f"ONNX (opset {info.get('opset')})"
    made = f"made by `{manifest['stage']}`" if manifest.get("stage") else "no manifest"
    out.print(f"[bold]{escape(info['artifact'])}[/bold]: {kind}, {made}")
    io = table("Inputs and outputs", "tensor", "dtype", "shape")
    for tensor in info.get("inputs", []) + info.get("outputs", []) or (info.get("engine") or {}).get("io", []):
        io.add_row(escape(tensor["name"]), str(tensor["dtype"]), str(tensor["shape"]))
    out.print(io)
    precision = table("Precision", "setting", "value")
    for key, value in (info.get("precision") or manifest.get("precision") or {}).items():
        precision.add_row(key, escape(str(value)))
    for key, value in (info.get("counts") or {}).items():
        precision.add_row(key.replace("_", " "), str(value))
    out.print(precision)
    spec = info.get("preprocessing") or manifest.get("preprocessing")
    if spec:
        out.print(f"[bold]Preprocessing[/bold]: {escape(Preprocessing.from_dict({**spec, 'class_names': None}).describe())}")
    options = manifest.get("options")
    if "engine" in info and options is not None:
        built = [f"TF32 {'on' if options.get('tf32') else 'off'}"]
        built += [name.replace("_", " ") for name in ("version_compatible", "hardware_compatible") if options.get(name)]
        out.print(f"[bold]Built with[/bold]: {', '.join(built)}")
    verification = manifest.get("verification")
    if verification:
        against = f" vs {verification['reference']}" if verification.get("reference") else ""
        metrics = table(f"Verification: {'PASS' if verification['passed'] else 'FAIL'}{escape(against)} on "
                        f"{escape(verification['inputs'])}", "metric", "value", "gate")
        gate = verification.get("gate") or {}
        limits = {"top1_agreement": (">=", gate.get("min_top1_agreement")), "min_cosine": (">=", gate.get("min_cosine")),
                  "accuracy_drop_points": ("<=", gate.get("max_accuracy_drop")),
                  "max_rel_err": ("<=", gate.get("max_rel_err"))}
        for key, value in verification["metrics"].items():
            if key == "statistics":
                continue
            sign, limit = limits.get(key, ("", None))
            metrics.add_row(key.replace("_", " "), f"{value:.6g}" if isinstance(value, float) else str(value),
                            "" if limit is None else f"{sign} {limit}")
        kernels = verification.get("kernels")
        if kernels:
            metrics.add_row("fused vs exact min cosine", f"{kernels['metrics']['min_cosine']:.6g}",
                            f">= {kernels['gate']['min_cosine']}")
        for failure in verification.get("failures", []):
            metrics.add_row("failed", escape(failure), "")
        out.print(metrics)
        print_statistics(out, verification["metrics"])
    serving = info.get("serving")
    if serving:
        recorded = serving["openvino"]
        made = ("not verified on OpenVINO when made" if not recorded else
                f"OpenVINO {'passed' if recorded['passed'] else 'missed'} its INT8 gate on {recorded['kernel_class']} "
                "when made")
        then = ("predict and triton serve it with OpenVINO here" if serving["openvino_verified_here"] else
                "predict and triton verify OpenVINO here against its recorded reference first, else serve it with "
                "ONNX Runtime")
        out.print(f"[bold]Serving[/bold]: {escape(made)}; this CPU is {escape(serving['this_kernel_class'])}: {then}")
    machines = info.get("cpu") or {}
    out.print(f"[bold]Verified on[/bold]: {escape(describe_cpu(machines.get('verified_on') or {}))}; "
              f"[bold]this machine[/bold]: {escape(describe_cpu(machines.get('this_machine') or {}))}")
    ops = info.get("ops")
    if ops:
        out.print("[bold]Op mix[/bold]: " + ", ".join(f"{op} {count}" for op, count in ops.items()))
    engine = info.get("engine") or {}
    if engine.get("unavailable"):
        out.print(f"[bold]Engine[/bold]: {escape(engine['unavailable'])}")
    elif "layers" in engine:
        print_layers(out, engine["layers"], engine.get("convolutions"))


def print_statistics(out, metrics: dict) -> None:
    """The reviewer's statistics of a verification (``statistics``) and the classes whose accuracy fell most."""
    from .checks.statistics import describe_statistics

    said = describe_statistics(metrics)
    if not said:
        return
    out.print(f"[bold]Statistics[/bold]: {escape(said)}")
    s = metrics["statistics"]
    if "accuracy_reference_ci95" in s:
        (rl, rh), (cl, ch) = s["accuracy_reference_ci95"], s["accuracy_candidate_ci95"]
        out.print(f"[bold]Accuracy, 95% CI[/bold]: reference {metrics['accuracy_reference']:.2%} ({rl:.2%} to {rh:.2%}), "
                  f"candidate {metrics['accuracy_candidate']:.2%} ({cl:.2%} to {ch:.2%})")
    fallen = s.get("classes_fallen_most")
    if fallen:
        grid = table("Classes whose accuracy fell most", "class", "images", "reference", "candidate", "drop (points)")
        for c in fallen:
            grid.add_row(escape(str(c["name"] or c["class"])), str(c["images"]), f"{c['accuracy_reference']:.1%}",
                         f"{c['accuracy_candidate']:.1%}", f"{c['drop_points']:.1f}")
        out.print(grid)


def print_layers(out, layers: list[dict] | None, convolutions: dict | None) -> None:
    """A plan's layers with the precisions they run in (``engine.inspector.engine_layers``), and its convolutions by precision."""
    if layers is None:
        out.print("[bold]Layers[/bold]: names only (the plan was built without detailed profiling verbosity); "
                  "rebuild it with `resnet-export trt` to see each layer's precision")
        return
    grid = table(f"Layers ({len(layers)})", "layer", "type", "inputs", "outputs", "tactic")
    for layer in layers:
        grid.add_row(escape(layer["name"]), escape(layer["type"]), ", ".join(layer["inputs"]),
                     ", ".join(layer["outputs"]), escape(str(layer["tactic"])))
    out.print(grid)
    out.print("[bold]Convolutions by input precision[/bold]: "
              + (", ".join(f"{p} {n}" for p, n in convolutions.items()) if convolutions else "none found"))
