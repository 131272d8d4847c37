"""The ``resnet-export`` command line: a thin client of the library.

Every ResnetExportError becomes one ``Error: ...`` line on stderr and its exit code; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import click

from ._version import __version__
from .bench.baseline import DEFAULT_MAX_REGRESSION
from .console import RichListener, RichLogHandler, as_flags, console
from .errors import EXIT_USER_ERROR, ResnetExportError, first_line


class ToolkitGroup(click.Group):
    """A click group that shows the library's logs and progress, and turns its errors into one line."""

    def main(self, args=None, *rest, **kwargs):
        """``--debug`` anywhere on the line (``resnet-export onnx --debug``) counts as the group's option."""
        import sys

        args = list(sys.argv[1:] if args is None else args)
        if "--debug" in args[1:]:
            args.remove("--debug")
            args.insert(0, "--debug")
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context):
        import logging

        from .progress import set_listener

        debug = ctx.params.get("debug", False)
        warnings.simplefilter("ignore")  # third-party chatter; the toolkit reports through logging
        library = logging.getLogger("resnet_export")
        handler, level = RichLogHandler(), library.level
        library.addHandler(handler)
        library.setLevel(logging.DEBUG if debug else logging.INFO)
        previous = set_listener(RichListener())
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except ResnetExportError as exc:
            if debug:
                raise
            click.echo(f"Error: {as_flags(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except Exception as exc:
            if debug:
                raise
            click.echo(f"Error: internal error: {type(exc).__name__}: {first_line(exc)} "
                       "(run with --debug for the traceback)", err=True)
            ctx.exit(EXIT_USER_ERROR)
        finally:
            set_listener(previous)
            library.removeHandler(handler)
            library.setLevel(level)


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (anywhere on the line).")
@click.version_option(__version__, prog_name="resnet-export")
def main(debug: bool) -> None:
    """Deploy PyTorch ResNets: folded FP32 ONNX verified against PyTorch, and more."""


# --------------------------------------------------------------------------- shared options


def _parse_size(_ctx, _param, value: str | None):
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not H or HxW") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise click.BadParameter(f"'{value}' is not H or HxW with positive integers")
    return (parts[0], parts[-1])


def _parse_floats(_ctx, _param, value: str | None):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of numbers") from None


def _parse_positive_ints(_ctx, _param, value: str | None):
    if value is None:
        return None
    items = value.split(",")
    if not all(item.strip().isdigit() and int(item) > 0 for item in items):
        raise click.BadParameter(f"'{value}' is not a comma-separated list of positive integers")
    return tuple(int(item) for item in items)


def _parse_opset(_ctx, _param, value: int | None):
    from .quantize.precision import MIN_OPSET

    if value is not None and value < MIN_OPSET:
        raise click.BadParameter(f"opset {value} is below {MIN_OPSET}, which `quantize` and `trt` need for this ONNX "
                                 "(ModelOpt's quantizer and AutoCast)")
    return value


def _parse_batch(_ctx, _param, value: str):
    if value == "dynamic":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter(f"'{value}' is neither 'dynamic' nor a positive integer")


def preprocessing_options(default: str) -> tuple:
    """``--resize/--interpolation/--mean/--std``, their help saying what applies when they are not given."""
    return (
        click.option("--resize", type=click.IntRange(min=1), metavar="N",
                     help="Shorter side before the center crop, as trained (the input size: no crop, images of that "
                          f"size used as they are; default: {default['resize']})."),
        click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]),
                     help=f"Resize interpolation (default: {default['interpolation']})."),
        click.option("--mean", callback=_parse_floats, metavar="M[,M,...]",
                     help=f"Normalisation mean per channel (default: {default['mean']})."),
        click.option("--std", callback=_parse_floats, metavar="S[,S,...]",
                     help=f"Normalisation std per channel (default: {default['std']})."),
    )


#: Defaults of a model loaded here, and of an ONNX made elsewhere (no toolkit metadata).
MODEL_PREPROCESSING = preprocessing_options({
    "resize": "the weights' transforms, else input size x 256/224", "interpolation": "the weights' transforms, else "
    "bilinear", "mean": "the weights' transforms, else ImageNet's", "std": "the weights' transforms, else ImageNet's"})
FOREIGN_PREPROCESSING = preprocessing_options({
    "resize": "none, images resized to the graph's input size", "interpolation": "bilinear", "mean": "0",
    "std": "1"})


def foreign_preprocessing_options(command):
    """``--resize/--interpolation/--mean/--std`` for an ONNX made elsewhere; the command receives ``stated``
    (the options given, as ``preprocessing.stated`` keywords)."""

    @functools.wraps(command)
    def wrapper(resize, interpolation, mean, std, **kwargs):
        given = {"resize": resize, "interpolation": interpolation, "mean": mean, "std": std}
        return command(stated={k: v for k, v in given.items() if v is not None}, **kwargs)

    return _with_options(FOREIGN_PREPROCESSING, wrapper)


MODEL_OPTIONS = (
    click.option("--arch", help="torchvision ResNet-family arch (default resnet50); see `resnet-export list`."),
    click.option("--model", "factory", metavar="FILE.py:FN|module:FN", help="Your own model: FN() returns an nn.Module."),
    click.option("--weights", help="torchvision weights name (IMAGENET1K_V2, DEFAULT, ...) or a checkpoint "
                                   "file (.pth/.pt loaded with weights_only=True, .safetensors)."),
    click.option("--num-classes", type=click.IntRange(min=1), help="Output classes (--arch only)."),
    click.option("--in-channels", type=click.IntRange(min=1), help="Input channels; != 3 replaces the stem conv (--arch only)."),
    click.option("--input-size", callback=_parse_size, metavar="H[xW]", help="Input size (default: the weights' transforms, else 224)."),
    *MODEL_PREPROCESSING,
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for random init and random inputs."),
)


def model_options(command):
    """Add the MODEL options; the command receives ``load`` (a function returning the LoadedModel)."""

    @functools.wraps(command)
    def wrapper(arch, factory, weights, num_classes, in_channels, input_size, mean, std, resize, interpolation, seed,
                **kwargs):
        from .source.models import load_model

        def load():
            with console.status("Loading model ..."):
                return load_model(arch, factory, weights, num_classes, in_channels, input_size, mean, std, seed,
                                  resize, interpolation)

        context = click.get_current_context()
        #: whether the command line named a model (the defaults alone do not)
        load.given = any(context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
                         for name in ("arch", "factory", "weights", "num_classes", "in_channels", "input_size"))
        return command(load=load, seed=seed, **kwargs)

    return _with_options(MODEL_OPTIONS, wrapper)


def _with_options(options, command):
    """Apply click options in the order listed (the first shows first in --help)."""
    for option in reversed(options):
        command = option(command)
    return command


def _output_option(suffix: str, default: str):
    return click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                        help=f"Output file ({suffix}; default: {default} in the current directory); its manifest is "
                             f"written beside it as {suffix}.json.")


# --------------------------------------------------------------------------- commands


@main.command("list")
def list_archs() -> None:
    """List the supported archs with parameters, GMACs at 224x224 and known weights."""
    from .source.models import ARCHS, arch_summary

    click.echo(f"{'arch':<18} {'params':>9} {'GMACs':>6}  weights")
    for arch in ARCHS:
        info = arch_summary(arch)
        click.echo(f"{arch:<18} {info['params'] / 1e6:>8.1f}M {info['gmacs']:>6.2f}  {', '.join(info['weights'])}")


@main.command()
@model_options
@click.option("--opset", type=int, callback=_parse_opset, default=None,
              help="ONNX opset (default 20; 19 at least, as quantize and trt need).")
@click.option("--batch", default="dynamic", callback=_parse_batch, show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--images", type=click.Path(path_type=Path), help="Verify on these images (ImageFolder layout gives labels).")
@click.option("--no-verify", is_flag=True, help="Skip the verification against PyTorch.")
@_output_option("OUT.onnx", "MODEL.onnx, e.g. resnet50.onnx")
def onnx(load, seed, opset, batch, images, no_verify, output) -> None:
    """Export a folded FP32 ONNX model and verify it against PyTorch."""
    from .source.export import DEFAULT_OPSET
    from .manifest import check_writable_dir
    from .pipeline import default_output, onnx_from_model

    if output:
        check_writable_dir(output)
    loaded = load()
    output = output or default_output(loaded.stem)
    result = onnx_from_model(loaded, output, opset=opset or DEFAULT_OPSET, batch=batch, images=images,
                             run_verification=not no_verify, seed=seed)
    left = len(result.onnx_fold.unfoldable)
    line = f"{loaded.name} -> {output}: {result.fold.summary()}, {left} BatchNormalization left"
    if result.verification:
        v = result.verification
        line += f"; vs PyTorch on {v.inputs} (batches {v.batches}): {v.summary()}: PASS"
    click.echo(f"{line}; preprocessing: {loaded.preprocessing.describe()}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip the comparison with the input on ONNX Runtime.")
@foreign_preprocessing_options
@_output_option("OUT.onnx", "IN.folded.onnx")
def fold(source, no_verify, stated, output) -> None:
    """Fold Conv -> BatchNormalization in an ONNX file made elsewhere, verified on ONNX Runtime.

    --resize, --interpolation, --mean and --std state its preprocessing, stored for later stages.
    """
    from .pipeline import fold_onnx_file, foreign_preprocessing

    output = output or Path(f"{source.stem}.folded.onnx")

    result = fold_onnx_file(source, output, run_verification=not no_verify,
                            preprocessing=foreign_preprocessing(source, stated))
    line = f"{source} -> {output}: {result.fold.summary()}"
    if result.to_inference:
        line += f" ({result.to_inference} training-mode BatchNormalization switched to running statistics)"
    if result.verification:
        line += f"; vs input: {result.verification.summary()}: PASS"
    click.echo(f"{line}; preprocessing: {result.preprocessing.describe()}")


def precision_options(cpu_target: bool):
    """Add the options shared by ``quantize`` and ``trt``: precision, calibration, gates; the calibration methods of
    the TensorRT target, and of the CPU target where the command makes it (``cpu_target``).

    The command receives ``make_request(required, **more)``, which builds the PrecisionRequest.
    """
    return functools.partial(_precision_options, cpu_target=cpu_target)


def _precision_options(command, cpu_target: bool):
    choices = ["entropy", "max", "percentile"] + (["minmax"] if cpu_target else [])
    methods = "trt target: entropy (default), max, percentile" + (
        "; cpu target: minmax (default), entropy, percentile" if cpu_target else "")
    options = (
        click.option("--fp16", is_flag=True, help="FP16 via ModelOpt AutoCast (FP32 inputs and outputs kept)."),
        click.option("--int8", is_flag=True, help="INT8 with explicit Q/DQ nodes, calibrated on --calib."),
        click.option("--calib", type=click.Path(path_type=Path), help="Calibration images (searched recursively) or a .npy/.npz of preprocessed inputs."),
        click.option("--calib-method", type=click.Choice(choices), help=f"{methods}."),
        click.option("--calib-size", type=click.IntRange(min=1), default=512, show_default=True, help="Calibration images to use (seeded choice)."),
        click.option("--val", type=click.Path(path_type=Path), help="Verification images (default: calibration folder images not used to calibrate)."),
        click.option("--min-agreement", type=click.FloatRange(0, 1), help="INT8 top-1 agreement to reach; keeps sensitive convs in higher precision until met."),
        click.option("--min-cosine", type=click.FloatRange(-1, 1), help="INT8 min cosine of the logits to reach (default 0.95); same search as --min-agreement."),
        click.option("--max-accuracy-drop", type=click.FloatRange(min=0), help="INT8 accuracy drop (points) to stay under; same search as --min-agreement."),
        click.option("--rest", type=click.Choice(["auto", "fp16", "fp32"]), default="auto", show_default=True,
                     help="INT8 for TensorRT: precision of the non-quantized part; auto tries FP16, then FP32 if the gate is missed."),
    )

    @functools.wraps(command)
    def wrapper(fp16, int8, calib, calib_method, calib_size, val, min_agreement, min_cosine, max_accuracy_drop, rest,
                **kwargs):
        def request(required: bool, **more):
            """The PrecisionRequest of these options and the command's own (target, seed, ...)."""
            from .pipeline import PrecisionRequest

            if fp16 and int8:
                raise click.UsageError("--fp16 and --int8 exclude each other: choose one")
            if required and not (fp16 or int8):
                raise click.UsageError("choose a precision: --fp16, or --int8 --calib DIR")
            return PrecisionRequest("int8" if int8 else "fp16" if fp16 else "fp32", calib=calib, method=calib_method,
                                    calib_size=calib_size, val=val, min_agreement=min_agreement,
                                    min_cosine=min_cosine, max_accuracy_drop=max_accuracy_drop, rest=rest, **more)

        return command(make_request=request, **kwargs)

    return _with_options(options, wrapper)


def _precision_line(result) -> str:
    record, v = result.record, result.verification
    what = record.dtype.upper()
    if record.dtype == "int8":
        rest = f", rest {record.rest.upper()}" if record.rest else ""
        form = f", {record.weight_bits}-bit weights ({record.cpu_form})" if record.cpu_form else ""
        what += (f" ({record.target}, {record.calibration_method}, {record.calibration_samples} "
                 f"calibration samples{rest}{form})")
    line = f"{what}; vs {v.reference} on {v.inputs}: {v.summary()}"
    rest_attempts = [a for a in result.attempts if not a.excluded]
    if len(rest_attempts) > 1:
        first = rest_attempts[0]
        line += (f"; rest {first.rest.upper()} missed the gate (top-1 agreement "
                 f"{first.metrics['top1_agreement']:.1%}), {record.rest.upper()} kept")
    if result.excluded:
        names = ", ".join(name for name, _ in result.excluded)
        line += (f"; kept {len(result.excluded)} conv(s) in higher precision ({names}); "
                 f"top-1 agreement before {result.before['top1_agreement']:.1%}")
    if result.random_weights and record.dtype == "int8":
        line += " (random weights: agreement on random weights is not a measure of quantization quality)"
    return as_flags(f"{line}: PASS; preprocessing: {result.preprocessing.describe()}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@precision_options(cpu_target=True)
@click.option("--target", type=click.Choice(["trt", "cpu"]), default="trt", show_default=True,
              help="trt: ModelOpt Q/DQ for TensorRT (rest per --rest); cpu: ONNX Runtime u8/s8 per-channel QDQ.")
@click.option("--cpu", "cpu_form", type=click.Choice(["portable", "vnni"]), default="portable", show_default=True,
              help="cpu target weights: portable (7-bit, exact on every CPU at the same speed); vnni (8-bit, only for "
                   "fleets with VNNI/AMX or ARM64: on AVX2-only CPUs such as Zen 2/3 or pre-Cascade Lake Xeons "
                   "ONNX Runtime's kernels saturate and accuracy collapses).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the calibration choice and random inputs.")
@foreign_preprocessing_options
@_output_option("OUT.onnx", "IN.fp16.onnx, IN.int8.onnx (trt target) or IN.cpu-int8.onnx")
def quantize(source, make_request, target, cpu_form, seed, stated, output):
    """Make an FP16 or INT8 (Q/DQ) ONNX from an FP32 ONNX, verified against it.

    For an ONNX made elsewhere, --resize, --interpolation, --mean and --std state its preprocessing.
    """
    from .pipeline import default_output, foreign_preprocessing, precision_from_onnx

    request = make_request(True, target=target, seed=seed, cpu_form=cpu_form)
    output = output or default_output(source.stem, request.precision, target)
    result = precision_from_onnx(source, output, request, preprocessing=foreign_preprocessing(source, stated))
    click.echo(f"{source} -> {output}: {_precision_line(result)}")


@main.command()
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Build from this ONNX instead of exporting MODEL.")
@model_options
@precision_options(cpu_target=False)
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True, help="Optimization profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Optimization profile: batch to tune for.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True, help="Optimization profile: largest batch.")
@click.option("--workspace", type=click.IntRange(min=1), metavar="MIB", help="Builder workspace memory pool limit in MiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), help="Timing cache file: loaded when present, saved after the build.")
@click.option("--builder-opt-level", type=click.IntRange(0, 5), help="TensorRT builder optimization level (0-5).")
@click.option("--version-compatible", is_flag=True, help="Build a plan that later TensorRT releases of the same major can run.")
@click.option("--hardware-compat", is_flag=True, help="Build a plan that runs on any Ampere or newer GPU.")
@click.option("--tf32/--no-tf32", default=False, show_default=True,
              help="Let FP32 layers compute in TF32 (TensorRT's and trtexec's default; the FP32 gate becomes FP16's).")
@click.option("--onnx-only", is_flag=True, help="Stop after writing OUT.onnx (the engine is built elsewhere).")
@_output_option("OUT.plan", "MODEL.PRECISION.plan, e.g. resnet50.int8.plan, beside resnet50.int8.onnx")
def trt(onnx_path, load, seed, make_request, min_batch, opt_batch, max_batch, workspace, timing_cache,
        builder_opt_level, version_compatible, hardware_compat, tf32, onnx_only, output):
    """Export, convert precision for TensorRT, verify, then build and verify the engine."""
    from .pipeline import default_output, trt_from_source
    from .engine.build import BatchProfile, BuildOptions, check_profile

    request = make_request(False, target="trt", seed=seed)  # checks the calibration data before any export
    profile = check_profile(BatchProfile(min_batch, opt_batch, max_batch), None)
    options = BuildOptions(workspace, str(timing_cache) if timing_cache else None, builder_opt_level,
                           version_compatible, hardware_compat, tf32)
    if output is None and onnx_path and request.precision == "fp32":  # the hand-off: the ONNX's name says it all
        output = Path(f"{onnx_path.stem}.plan")
    elif output is None:
        loaded = None if onnx_path else load()
        load = (lambda: loaded) if loaded else load
        output = default_output(onnx_path.stem if onnx_path else loaded.stem, request.precision, suffix=".plan")
    source = {"onnx_path": onnx_path} if onnx_path else {"load": load}
    result = trt_from_source(output, **source, request=request, profile=profile, options=options, onnx_only=onnx_only)
    if result.fp32:
        click.echo(f"{result.fp32.path.name}: FP32 ONNX vs PyTorch: {result.fp32.verification.summary()}: PASS")
    if result.precision:
        click.echo(f"{result.onnx}: {_precision_line(result.precision)}")
    if result.engine is None:
        click.echo(f"{result.onnx} written; --onnx-only: no engine built")
        return
    record, v = result.engine.record, result.engine.verification
    click.echo(f"{output}: {record.precision['dtype'].upper()} engine (TF32 {'on' if tf32 else 'off'}), TensorRT "
               f"{record.runtime.tensorrt} on {record.runtime.gpu} (built in {record.build_seconds} s); "
               f"vs {v.reference} (batches {v.batches}): {v.summary()}: PASS")


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@model_options
@click.option("--images", type=click.Path(path_type=Path),
              help="Verify on this folder's images, streamed (ImageFolder layout gives labels).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Gate to apply (default: the precision the artifact records).")
@click.option("--backend", type=click.Choice(["ort", "openvino"]), default="ort", show_default=True,
              help="What runs an ONNX: ONNX Runtime (and its exact run for INT8), or OpenVINO compiled for this CPU.")
@click.option("--results", type=click.Path(path_type=Path), metavar="OUT.jsonl",
              help="With --images: write each image's results to OUT.jsonl as they come, and the summary to OUT.json.")
@click.option("--resume", is_flag=True, help="Continue an interrupted --results run from OUT.jsonl.partial.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="With --images: score the batches on Ray Data (--ray: a local cluster; --ray auto; ray://HOST:10001).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --ray: actors, each holding the reference and the artifact.")
def verify_command(artifact, load, seed, images, precision, backend, results, resume, ray_address, workers):
    """Compare an ONNX file or a TensorRT plan with PyTorch, using the gate of its precision and weights.

    With the model options (--arch or --model, --weights, ...), against that PyTorch model; without them, against
    the PyTorch logits the artifact (a plan: its ONNX) recorded when it was made. --images streams a folder of any
    size (memory does not grow with it); with labels the line gives both accuracies with 95% intervals, the paired
    drop, the answers changed each way and McNemar's p-value.
    """
    from .cpu import cpu_info, describe_cpu
    from .pipeline import recorded_verification, verify_artifact

    if (results or resume or ray_address) and not images:
        raise click.UsageError("--results, --resume and --ray go with --images")
    if results and results.suffix != ".jsonl":
        raise click.UsageError(f"--results {results} must end in .jsonl")
    if resume and not results:
        raise click.UsageError("--resume continues the --results OUT.jsonl it names")
    loaded = load() if load.given or images else None
    precision, origin, v = verify_artifact(artifact, loaded, images=images, seed=seed, precision=precision,
                                           backend=backend, results=results, resume=resume, ray_address=ray_address,
                                           workers=workers)
    on = " on OpenVINO" if backend == "openvino" else ""
    line = (f"{artifact}: {precision.upper()} (from {origin}){on} vs {v.reference} (batches "
            f"{v.batches}), {describe_cpu(cpu_info())}: {v.summary()}")
    recorded = recorded_verification(artifact)
    if recorded and recorded.get("metrics"):
        m = recorded["metrics"]
        line += (f"; when made ({describe_cpu(recorded.get('cpu') or {})}): top-1 agreement "
                 f"{m['top1_agreement']:.1%}, min cosine {m['min_cosine']:.7f}")
    fallen = (v.metrics.get("statistics") or {}).get("classes_fallen_most")
    if fallen:
        click.echo("classes that fell most: " + ", ".join(
            f"{c['name'] or c['class']} {c['accuracy_reference']:.0%}->{c['accuracy_candidate']:.0%} "
            f"({c['images']} images)" for c in fallen))
    if results:
        click.echo(f"per-image results: {results}; summary: {results.with_suffix('.json')}")
    click.echo(line + ": PASS")  # the verdict last


#: The command line's backend names (as predict, verify and bench spell them) -> Triton's.
TRITON_BACKENDS = {"ort": "onnxruntime", "openvino": "openvino"}
ALLOW_FAILED = click.option("--allow-failed", is_flag=True,
                            help="Serve an artifact whose manifest says it failed its gate (refused otherwise; a "
                                 "warning says so on every run).")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Classes to keep per image.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Images per inference batch.")
@click.option("--backend", type=click.Choice(["ort", "openvino", "trt"]),
              help="ort (CUDA provider when present) or openvino for an ONNX; trt for a plan (default: trt for a plan, "
                   "openvino for a CPU-target INT8 ONNX without a GPU where installed, the faster there, else ort).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray Data: --ray (a local cluster), --ray auto, or --ray ray://HOST:10001.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --ray: inference actors, one session each.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.partial, skipping the images it holds.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="OUT.jsonl (one object per image) or OUT.csv (path, then index, class, score per rank); rows "
                   "stream to OUT.partial, renamed to OUT when the folder is done.")
@ALLOW_FAILED
def predict(artifact, images, top_k, batch, backend, ray_address, workers, resume, output, allow_failed):
    """Run an ONNX file or a plan on IMAGES (a folder, searched recursively, or image files); write the top-k classes
    of each."""
    from .deploy.predict import partial_path, predict_folder

    try:
        result = predict_folder(artifact, images, output, top_k=top_k, batch=batch, backend=backend,
                                ray_address=ray_address, workers=workers, resume=resume, allow_failed=allow_failed)
    except KeyboardInterrupt:
        partial = partial_path(output)
        if partial.exists():
            click.echo(f"Interrupted: the rows so far are in {partial}; run the same command with --resume to "
                       "continue", err=True)
        raise click.exceptions.Exit(130) from None
    backend = f"{result.backend}; {result.verified}" if result.verified else result.backend
    line = f"{artifact} on {' '.join(map(str, images))} ({backend}): {result.predicted} images -> {output}"
    if result.resumed:
        line += f" ({result.resumed} from the interrupted run)"
    if result.skipped:
        line += f", {len(result.skipped)} unreadable skipped"
    if result.accuracy is not None:
        line += f"; top-1 accuracy {result.accuracy:.1%}"
    if result.images_per_second:
        line += f"; {result.images_per_second:.1f} img/s"
    if result.workers is not None:
        line += f" on Ray, {result.workers} of {workers} workers ran batches"
    click.echo(line)


@main.command()
@click.argument("reports", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for trend.md and trend.png.")
def trend(reports, output):
    """Turn a folder of bench reports (report.json, any depth) into a trend of speed-up and agreement per row."""
    from .bench.baseline import trend as write_trend

    paths = write_trend(reports, output)
    click.echo(paths["trend.md"].read_text())
    click.echo(f"Trend: {', '.join(str(p) for p in paths.values())}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model repository folder.")
@click.option("--name", help="Model name (default: the artifact's stem, sanitized).")
@click.option("--version", "model_version", type=click.IntRange(min=1), default=1, show_default=True, help="Model version folder.")
@click.option("--max-batch", type=click.IntRange(min=0), help="max_batch_size (default: the plan's profile max, 32 for a dynamic ONNX, as trt's).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True, help="Model instances.")
@click.option("--kind", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True, help="Instance kind (a plan: GPU).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True, help="Dynamic batcher queue delay.")
@click.option("--preferred-batch", callback=_parse_positive_ints, metavar="N[,N,...]",
              help="Preferred batch sizes (default: none, Triton's advice).")
@click.option("--ort-trt", is_flag=True, help="ONNX Runtime's TensorRT accelerator for an ONNX on GPU, with profile shapes.")
@click.option("--backend", type=click.Choice(["ort", "openvino"]), default="ort", show_default=True,
              help="Triton backend for an ONNX: ort (Triton's onnxruntime backend) or openvino, on CPU instances (the CPU "
                   "peer for a CPU-target INT8).")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), help="Class names, one per line (default: the artifact's).")
@click.option("--force", is_flag=True, help="Replace an existing version.")
@ALLOW_FAILED
def triton(artifact, repo, name, model_version, max_batch, instances, kind, max_queue_delay_us, preferred_batch, ort_trt,
           backend, labels, force, allow_failed):
    """Write a Triton model repository entry (config.pbtxt, VERSION/model.onnx|model.plan, labels, README)."""
    from .deploy.triton import TritonRequest, triton_entry

    request = TritonRequest(name, model_version, max_batch, instances, kind, max_queue_delay_us,
                            preferred_batch or (), ort_trt, labels, force, TRITON_BACKENDS[backend], allow_failed)
    result = triton_entry(artifact, repo, request)
    click.echo(f"{artifact} -> {result.model_dir}: {result.backend} backend, version {model_version}, max_batch_size "
               f"{result.max_batch_size}, {result.labels or 'no'} labels; config validated as Triton's ModelConfig")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole description as JSON, for machines.")
def inspect(artifact, as_json):
    """Report what an ONNX file or a plan is: I/O, precision, preprocessing, verification, machines, op mix."""
    from .console import print_description
    from .deploy.describe import describe

    info = describe(artifact)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        print_description(info)


@main.command()
@model_options
@click.option("--backends", default="torch,ort", show_default=True,
              help="Comma-separated: torch, torch-compile, ort, ort-openvino (OpenVINO kernels through ONNX Runtime), "
                   "ort-cuda, ort-trt, trt, openvino.")
@click.option("--precisions", default="fp32,int8", show_default=True, help="Comma-separated: fp32, fp16, bf16, int8.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma-separated positive integers.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--iters", type=click.IntRange(min=1), help="Timed runs per row (default: as many as --min-time allows).")
@click.option("--min-time", type=click.FloatRange(min=0), default=2.0, show_default=True, help="Seconds of timed runs per row.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Time the rows in turn, this many times over (their share of --iters/--min-time each), so a slow "
                   "spell of the machine falls on every row alike.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch, ONNX Runtime and OpenVINO.")
@click.option("--calib", type=click.Path(path_type=Path), help="INT8 calibration images or .npy/.npz (default: seeded random inputs).")
@click.option("--calib-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Calibration images to use, as quantize and trt (without --calib: 64 seeded random inputs).")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report folder: report.json, report.md, throughput.png, latency.png; artifacts/ inside.")
@click.option("--baseline", type=click.Path(exists=True, path_type=Path),
              help="A report.json to compare with, or a folder of them (the one of this model and CPU class).")
@click.option("--max-regression", type=click.FloatRange(min=0), default=DEFAULT_MAX_REGRESSION, show_default=True, metavar="PCT",
              help="With --baseline: speed-up (or, same environment, img/s) drop that fails the run (exit 3).")
@click.option("--tf32/--no-tf32", default=False, show_default=True,
              help="Let ONNX Runtime's and TensorRT's FP32 rows on the GPU use TF32 (PyTorch FP32 runs both as "
                   "PyTorch defaults, TF32 convolutions, and strict).")
@click.option("--cuda-graph", is_flag=True, help="Also time every TensorRT row replaying a CUDA graph (trtexec --useCudaGraph).")
@click.option("--streams", type=click.IntRange(min=1), default=1, show_default=True,
              help="Also time each GPU row with this many runners at once, each on its own stream and thread.")
@click.option("--plan", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Time this TensorRT plan alone (trtexec --loadEngine): precision and reference from its manifest.")
@ALLOW_FAILED
def bench(load, seed, backends, precisions, batch_sizes, warmup, iters, min_time, rounds, threads, calib, calib_size,
          report, baseline, max_regression, tf32, cuda_graph, streams, plan, allow_failed):
    """Measure latency and throughput per backend, precision and batch, checked against PyTorch."""
    from .bench.harness import (
        BACKENDS,
        PRECISIONS,
        Settings,
        parse_batch_sizes,
        parse_list,
        prepare_report,
        run_benchmark,
    )
    from .errors import GateFailed

    context = click.get_current_context()
    if plan is not None:
        given = [f"--{name}" for name in ("backends", "precisions", "calib")
                 if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--plan times that plan alone (as trtexec --loadEngine): {', '.join(given)} "
                                   "does not apply")
    backends = parse_list(backends, BACKENDS, "backend")
    precisions = parse_list(precisions, PRECISIONS, "precision")
    settings = Settings(parse_batch_sizes(batch_sizes), warmup, iters, min_time, threads, rounds, tf32, cuda_graph,
                        streams)
    prepare_report(report)  # before the model loads: a bad folder fails at once
    paths, comparison = run_benchmark(None if plan else load(), report, backends, precisions, settings, calib,
                                      calib_size, seed, baseline, max_regression, plan, allow_failed)
    click.echo(paths["report.md"].read_text())
    click.echo(f"Reports: {', '.join(str(p) for p in paths.values())}")
    if comparison and comparison.regressions:
        rows = "; ".join(f"{c.row} {c.measure} {c.baseline:.4g} -> {c.now:.4g} ({c.change})" for c in comparison.regressions)
        raise GateFailed(f"{len(comparison.regressions)} regression(s) against {comparison.baseline}: {rows}")
