"""A real, trained model for the precision tests: a small ResNet on scikit-learn's handwritten digits.

The digits (8x8 grayscale scans, shipped inside scikit-learn's wheel) are written as PNG files in the
ImageFolder layout (`train/`, `val/`, one folder per digit) and the model is trained on them through
the toolkit's own preprocessing, so calibration and verification see exactly what training saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from resnet_export.data import image_inputs
from resnet_export.models import load_model

FACTORY = str(Path(__file__).parent / "user_models.py") + ":digits_resnet"
INPUT_SIZE = (32, 32)
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


def train_digits(train_dir: Path, checkpoint: Path, epochs: int = 6, seed: int = 0) -> float:
    """Train the digits ResNet on ``train_dir`` and save its state dict; returns train accuracy."""
    model = load_model(model=FACTORY, input_size=INPUT_SIZE, seed=seed)
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
