"""Regenerate tests/data/images from the photos that ship inside scikit-image's wheel (no download).

ImageFolder layout: one folder per class. The images are shrunk so the repository stays small;
`camera` is grayscale and `logo` is RGBA, so channel conversion is exercised too.
Run: .venv/bin/python tests/data/make_images.py
"""

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

IMAGES = {
    "cat/chelsea.jpg": data.chelsea,
    "cup/coffee.jpg": data.coffee,
    "person/astronaut.jpg": data.astronaut,
    "person/camera.png": data.camera,
    "rocket/rocket.jpg": data.rocket,
    "logo/logo.png": data.logo,
}
MAX_SIDE = 192

root = Path(__file__).parent / "images"
for name, load in IMAGES.items():
    image = Image.fromarray(np.asarray(load()))
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
    print(path, image.mode, image.size)
