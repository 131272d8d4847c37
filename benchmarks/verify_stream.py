"""`verify` at validation-set size on this machine: images/s with and without the decoder pool, against the
runners alone, and peak RSS as the number of images grows (issue 39).

    .venv/bin/python benchmarks/verify_stream.py [--images 2000] [--work DIR] [--out FILE.json]

Writes JSON-ready figures to stdout (and FILE): the machine (CPU and flags), the speeds of resnet50's PyTorch FP32
reference, its CPU-target INT8 ONNX on ONNX Runtime and the exact run of that graph, each alone on decoded
batches, then `verify` over the images with a pool of two decoder threads and without (decoded in the runners'
thread; image_stream.DECODERS picks between them by the cores). Peak RSS: `verify` in a fresh process over 2,000 and 20,000 tiny images (a 32x32 resnet18), and
over 500 and 2,000 images at 224x224 (resnet18), each its own process (VmHWM, reset once the ONNX is exported).
The images are JPEGs of 500x375 (ImageNet's typical size) cut from the test images with seeded crops and flips.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "tests" / "data" / "images"


def make_images(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> Path:
    """``count`` JPEGs in an ImageFolder of the test images' classes (kept across runs)."""
    from PIL import Image, ImageOps

    sources = sorted(p for p in SOURCES.rglob("*") if p.is_file())
    rng = np.random.default_rng(0)
    for i in range(count):
        src = sources[i % len(sources)]
        out = folder / src.parent.name / f"{i:06d}.jpg"
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as image:
            image = image.convert("RGB").resize((size[0] * 2, size[1] * 2))
            left, top = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
            image = image.crop((left, top, left + size[0], top + size[1]))
            if rng.random() < 0.5:
                image = ImageOps.mirror(image)
            image.save(out, quality=90)
    return folder


def rate(runner, batch: np.ndarray, seconds: float = 20.0) -> float:
    """Images/s of ``runner`` alone on one decoded batch, repeated for about ``seconds``."""
    runner.infer(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.infer(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def speeds(work: Path, count: int) -> dict:
    from resnet_export.data import image_folder
    from resnet_export.source.models import load_model
    from resnet_export.pipeline import PrecisionRequest, onnx_from_model, precision_from_onnx, verify_artifact
    from resnet_export.runtime.runners import OrtRunner, TorchRunner

    images = make_images(work / f"jpeg{count}", count)
    model = load_model(arch="resnet50")
    fp32, int8 = work / "resnet50.onnx", work / "resnet50.cpu-int8.onnx"
    if not int8.exists():
        onnx_from_model(model, fp32)
        precision_from_onnx(fp32, int8, PrecisionRequest("int8", images, "cpu", calib_size=256),
                            reference=TorchRunner(model.module))
    spec = model.preprocessing
    batch = image_folder(images, spec).head(8).array
    alone = {"torch_fp32": rate(TorchRunner(model.module), batch), "ort_int8": rate(OrtRunner(int8), batch),
             "ort_int8_exact": rate(OrtRunner(int8, exact=True), batch)}
    figures = {"images": count, "alone_images_per_second": alone}
    for name, decoders in (("pool_of_2", 2), ("no_pool", 0)):
        start = time.perf_counter()
        verify_artifact(int8, model, images=images, decoders=decoders)
        figures[f"verify_{name}_images_per_second"] = count / (time.perf_counter() - start)
    return figures


RSS_CHILD = """
import sys
from pathlib import Path
from resnet_export.source.models import load_model
from resnet_export.pipeline import onnx_from_model, verify_artifact
size, folder, onnx = int(sys.argv[1]), sys.argv[2], sys.argv[3]
model = load_model(arch="resnet18", num_classes=10, input_size=(size, size))
onnx_from_model(model, onnx, run_verification=False)
status = lambda key: int(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key)))
Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the export's own peak is not verify's
before = status("VmRSS")
try:
    verify_artifact(onnx, model, images=folder)
except Exception as exc:  # a missed gate still measured the memory
    print(exc, file=sys.stderr)
print(before * 1024, status("VmHWM") * 1024)
"""


def peak_rss(work: Path, size: int, count: int) -> dict:
    """RSS before and peak RSS during ``verify`` (bytes, VmRSS and VmHWM reset after the export) of a fresh process
    verifying a resnet18 FP32 ONNX at ``size`` on ``count`` images."""
    folder = make_images(work / f"jpeg{size}-{count}", count, (size + size // 7, size + size // 7))
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(size), str(folder), str(work / f"r18-{size}.onnx")],
                         check=True, capture_output=True, text=True)
    before, peak = map(int, out.stdout.split()[-2:])
    return {"rss_before": before, "peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/resnet-export-verify-bench"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-speed", action="store_true", help="only the memory figures")
    parser.add_argument("--skip-memory", action="store_true", help="only the speed figures")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from resnet_export.cpu import cpu_info, describe_cpu
    from resnet_export.image_stream import DECODERS

    figures = {"machine": describe_cpu(cpu_info()), "flags": cpu_info().get("flags"), "decoders": DECODERS}
    if not args.skip_speed:
        figures["speed"] = speeds(args.work, args.images)
    if not args.skip_memory:
        figures["rss_bytes"] = {f"{size}x{size}, {count} images": peak_rss(args.work, size, count)
                                for size, counts in ((32, (2000, 20000)), (224, (500, 2000))) for count in counts}
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
