"""The ``resnet-export`` command line: a thin client of the library.

Every ResnetExportError becomes one ``Error: ...`` line on stderr and its exit code; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import click

from . import __version__
from .console import console, warn
from .errors import EXIT_USER_ERROR, ResnetExportError, ResnetExportWarning, first_line


class ToolkitGroup(click.Group):
    """A click group that turns toolkit errors into one line and an exit code."""

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", ResnetExportWarning)
        warnings.showwarning = lambda message, *args, **kwargs: warn(str(message))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except ResnetExportError as exc:
            if debug:
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except Exception as exc:
            if debug:
                raise
            click.echo(f"Error: internal error: {type(exc).__name__}: {first_line(exc)} "
                       "(run with --debug for the traceback)", err=True)
            ctx.exit(EXIT_USER_ERROR)


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
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


def _parse_batch(_ctx, _param, value: str):
    if value == "dynamic":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter(f"'{value}' is neither 'dynamic' nor a positive integer")


MODEL_OPTIONS = (
    click.option("--arch", help="torchvision ResNet-family arch (default resnet50); see `resnet-export list`."),
    click.option("--model", "factory", metavar="FILE.py:FN|module:FN", help="Your own model: FN() returns an nn.Module."),
    click.option("--weights", help="torchvision weights name (IMAGENET1K_V2, DEFAULT, ...) or a checkpoint "
                                   "file (.pth/.pt loaded with weights_only=True, .safetensors)."),
    click.option("--num-classes", type=click.IntRange(min=1), help="Output classes (--arch only)."),
    click.option("--in-channels", type=click.IntRange(min=1), help="Input channels; != 3 replaces the stem conv (--arch only)."),
    click.option("--input-size", callback=_parse_size, metavar="H[xW]", help="Input size (default: the weights' transforms, else 224)."),
    click.option("--mean", callback=_parse_floats, metavar="M[,M,...]", help="Normalisation mean per channel."),
    click.option("--std", callback=_parse_floats, metavar="S[,S,...]", help="Normalisation std per channel."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for random init and random inputs."),
)


def model_options(command):
    """Add the MODEL options; the command receives ``load`` (a function returning the LoadedModel)."""

    @functools.wraps(command)
    def wrapper(arch, factory, weights, num_classes, in_channels, input_size, mean, std, seed, **kwargs):
        from .models import load_model

        def load():
            with console.status("Loading model ..."):
                return load_model(arch, factory, weights, num_classes, in_channels, input_size, mean, std, seed)

        return command(load=load, seed=seed, **kwargs)

    for option in reversed(MODEL_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def _output_option(suffix: str):
    return click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
                        help=f"Output file ({suffix}); its manifest is written beside it as {suffix}.json.")


# --------------------------------------------------------------------------- commands


@main.command("list")
def list_archs() -> None:
    """List the supported archs with parameters, GMACs at 224x224 and known weights."""
    from .models import ARCHS, arch_summary

    click.echo(f"{'arch':<18} {'params':>9} {'GMACs':>6}  weights")
    for arch in ARCHS:
        info = arch_summary(arch)
        click.echo(f"{arch:<18} {info['params'] / 1e6:>8.1f}M {info['gmacs']:>6.2f}  {', '.join(info['weights'])}")


@main.command()
@model_options
@click.option("--opset", type=click.IntRange(min=1), default=None, help="ONNX opset (default 20).")
@click.option("--batch", default="dynamic", callback=_parse_batch, show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--images", type=click.Path(path_type=Path), help="Verify on these images (ImageFolder layout gives labels).")
@click.option("--no-verify", is_flag=True, help="Skip the verification against PyTorch.")
@_output_option("OUT.onnx")
def onnx(load, seed, opset, batch, images, no_verify, output) -> None:
    """Export a folded FP32 ONNX model and verify it against PyTorch."""
    from .export import DEFAULT_OPSET
    from .manifest import check_writable_dir
    from .pipeline import onnx_from_model

    check_writable_dir(output)
    loaded = load()
    result = onnx_from_model(loaded, output, opset or DEFAULT_OPSET, batch, images, not no_verify, seed)
    left = len(result.onnx_fold.unfoldable)
    line = f"{loaded.name} -> {output}: {result.fold.summary()}, {left} BatchNormalization left"
    if result.verification:
        v = result.verification
        line += f"; vs PyTorch on {v.inputs} (batches {','.join(map(str, v.batch_sizes))}): {v.summary()}: PASS"
    click.echo(line)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip the comparison with the input on ONNX Runtime.")
@_output_option("OUT.onnx")
def fold(source, no_verify, output) -> None:
    """Fold Conv -> BatchNormalization in an ONNX file made elsewhere, verified on ONNX Runtime."""
    from .pipeline import fold_onnx_file

    result = fold_onnx_file(source, output, not no_verify)
    line = f"{source} -> {output}: {result.fold.summary()}"
    if result.to_inference:
        line += f" ({result.to_inference} training-mode BatchNormalization switched to running statistics)"
    if result.verification:
        line += f"; vs input: {result.verification.summary()}: PASS"
    click.echo(line)
