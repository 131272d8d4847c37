"""How an image becomes a model's input: the preprocessing spec stored in the ONNX metadata (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .errors import ModelError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass
class Preprocessing:
    """How an image becomes the model's input; stored in the ONNX so later stages reuse it."""

    input_size: tuple[int, int]  # (H, W) the model takes
    resize: int  # shorter side is resized to this, then center-cropped to input_size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    interpolation: str = "bilinear"
    class_names: list[str] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The preprocessing in words, enough to reproduce the input tensor."""
        height, width = self.input_size
        values = lambda v: ", ".join(f"{x:g}" for x in v)  # noqa: E731
        return (f"shorter side to {self.resize} ({self.interpolation}), center crop {height}x{width}, "
                f"[0, 1], mean {values(self.mean)}, std {values(self.std)}, {self.channels} channel(s)")

    def same_as(self, other: "Preprocessing") -> bool:
        """Whether both turn an image into the same tensor (class names aside)."""
        return replace(self, class_names=None) == replace(other, class_names=None)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        data = dict(data)
        for key in ("input_size", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)


def per_channel(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    """``values`` for ``channels`` channels: one value repeated, or exactly one per channel."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ModelError(f"`{what}` has {len(values)} values but the model takes {channels} channels")
    return values


def stated(spec: Preprocessing, *, resize: int | None = None, interpolation: str | None = None,
           mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Preprocessing:
    """``spec`` with what the user stated: ``resize`` (the shorter side before the center crop; the input
    size itself means no crop, images of that size used as they are), ``interpolation``, ``mean``, ``std``."""
    if resize is not None and resize < min(spec.input_size):
        raise ModelError(f"`resize` {resize} is below the input size {spec.input_size[0]}x{spec.input_size[1]}: "
                         "the shorter side must cover the crop")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ModelError(f"unknown `interpolation` '{interpolation}'; choose one of {', '.join(INTERPOLATIONS)}")
    return replace(
        spec,
        resize=spec.resize if resize is None else resize,
        interpolation=interpolation or spec.interpolation,
        mean=spec.mean if mean is None else per_channel(mean, spec.channels, "mean"),
        std=spec.std if std is None else per_channel(std, spec.channels, "std"),
    )
