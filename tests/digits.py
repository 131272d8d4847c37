"""Real, trained models for the precision tests, on scikit-learn's handwritten digits.

The digits (8x8 grayscale scans, shipped inside scikit-learn's wheel) are written as PNG files in the
ImageFolder layout (`train/`, `val/`, one folder per digit) and the models are trained on them through
the toolkit's own preprocessing, so calibration and verification see exactly what training saw.
Two models: the small CIFAR-style ResNet of ``user_models.digits_resnet`` (``DIGITS_RESNET``, ~15 s)
and torchvision's ResNet-18 with one input channel (``RESNET18``, ~30 s), whose TensorRT-target INT8
with the rest in FP16 looked 1.6 points worse than it is on ONNX Runtime's CPU (see ort_fixes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from resnet_export.data import image_inputs
from resnet_export.source.models import load_model

FACTORY = str(Path(__file__).parent / "user_models.py") + ":digits_resnet"
INPUT_SIZE = (32, 32)
DIGITS_RESNET = {"model": FACTORY, "input_size": INPUT_SIZE}
RESNET18 = {"arch": "resnet18", "num_classes": 10, "in_channels": 1, "input_size": INPUT_SIZE}
VAL_FRACTION = 0.25


def write_digit_images(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the 1797 digits as 32x32 PNGs: 75% under train/, 25% under val/ (seeded split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    n_val = int(len(order) * VAL_FRACTION)
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = root / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, "L").resize(INPUT_SIZE, Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root / "train", root / "val"


def train_digits(train_dir: Path, checkpoint: Path, epochs: int = 6, seed: int = 0,
                 source: dict = DIGITS_RESNET) -> float:
    """Train the model ``load_model(**source)`` on ``train_dir`` and save its state dict; returns train accuracy."""
    model = load_model(**source, seed=seed)
    data = image_inputs(train_dir, model.preprocessing)
    x, y = torch.from_numpy(data.array), torch.from_numpy(data.labels)
    net = model.module.train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * -(-len(x) // 64))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            loss_fn(net(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    torch.save(net.state_dict(), checkpoint)
    return accuracy


if __name__ == "__main__":
    import sys
    import tempfile
    import time

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    start = time.perf_counter()
    train_dir, val_dir = write_digit_images(root)
    print("train accuracy", train_digits(train_dir, root / "digits.pth"), f"{time.perf_counter() - start:.1f} s")
