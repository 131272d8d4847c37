"""How an image becomes a model's input: the preprocessing spec stored in the ONNX metadata (no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        data = dict(data)
        for key in ("input_size", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)
