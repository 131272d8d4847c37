"""`make gpu-check`: every GPU claim of the toolkit in one command, on one CUDA GPU, in under 10 minutes.

1. The packages it needs, each with its version or the rows it costs. Without one every row needs, it stops
   before spending GPU time and names them all (on a machine with no package index, carry their wheels).
2. `pytest -m gpu`: the CUDA seam (captures that wait for no other stream), PyTorch's and ONNX Runtime's
   device runners, and TensorRT where it is installed.
3. The GPU matrix on resnet50, batches 1, 32 and 256: torch FP32 (the baseline) / FP16 / BF16, torch-compile
   FP16 / BF16, ort-cuda FP32 / FP16 / INT8 with and without host-device copies, trt FP32 / FP16 / INT8 with and
   without a CUDA graph where TensorRT is installed. What cannot run is a row that says why.
4. Each PyTorch row against the figures a plain script measured on an H200 (benchmarks/gpu_reference.json):
   within 10%, or the report says why not.

It writes benchmarks/results/gpu-<gpu name>/report.{json,md} and the charts, and prints the table. Exit 0 when
the GPU tests passed and every reference row matched or is explained; 1 when a GPU test failed; 2 when a
package every row needs is missing; 3 when a reference row is off by more than 10% for no stated reason.

    make gpu-check                       # in the project's .venv
    make gpu-check GPU_PYTHON=python3    # a GPU machine's own Python, the project on PYTHONPATH: nothing installed
    python benchmarks/gpu_check.py --arch resnet18 --input-size 64 --batch-sizes 1,4 --no-tests   # a dry run anywhere
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "gpu_reference.json"
BACKENDS = ("torch", "torch-compile", "ort-cuda", "trt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

#: (import name, distribution names to read the version from, what needs it); every row needs these.
REQUIRED = [
    ("torch", ("torch",), "every row"),
    ("torchvision", ("torchvision",), "the resnet50 model"),
    ("numpy", ("numpy",), "every row"),
    ("onnx", ("onnx",), "every ONNX and plan row"),
    ("onnxscript", ("onnxscript",), "the ONNX export (torch's dynamo exporter)"),
    ("onnxruntime", ("onnxruntime-gpu", "onnxruntime"), "verifying every ONNX against PyTorch"),
    ("PIL", ("pillow",), "image inputs"),
    ("matplotlib", ("matplotlib",), "the report's charts"),
]
#: Packages only some rows need.
OPTIONAL = [
    ("modelopt", ("nvidia-modelopt",), "FP16 and INT8 ONNX: ort-cuda fp16/int8, trt fp16/int8"),
    ("tensorrt", ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"), "trt rows"),
]


def version_of(module: str, distributions: tuple[str, ...]) -> str | None:
    """The installed version of ``module`` (from its distribution), or None when it cannot be imported."""
    if importlib.util.find_spec(module) is None:
        return None
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "present"


def package_table() -> list[dict]:
    """Every package the check uses: version (or None) and what it is needed for."""
    rows = [{"package": m, "version": version_of(m, d), "needed_for": why, "required": True} for m, d, why in REQUIRED]
    rows += [{"package": m, "version": version_of(m, d), "needed_for": why, "required": False} for m, d, why in OPTIONAL]
    present = {row["package"] for row in rows if row["version"]}
    if "torch" in present:
        import torch

        rows.append({"package": "CUDA (torch)", "version": torch.version.cuda if torch.cuda.is_available() else None,
                     "needed_for": "every GPU row", "required": False})
    if "onnxruntime" in present:
        import onnxruntime

        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        rows.append({"package": "ONNX Runtime CUDA provider (onnxruntime-gpu)", "version": "present" if cuda else None,
                     "needed_for": "ort-cuda rows", "required": False})
    return rows


def run_gpu_tests() -> dict:
    """``pytest -m gpu`` in a child process with this Python; returns its exit code and summary line."""
    child = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                            str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True)
    print(child.stdout[-4000:], child.stderr[-2000:], sep="\n")
    lines = [line for line in child.stdout.splitlines() if " passed" in line or " failed" in line or "skipped" in line]
    return {"exit_code": child.returncode, "summary": lines[-1].strip("= ") if lines else "no summary"}


def against_reference(rows: list[dict], environment: dict, reference: dict) -> list[dict]:
    """Each reference figure beside the matching row of this run (same backend, precision and batch, one stream,
    timed on the device): the ratio, and why it may differ (another GPU, another TF32 setting, no such row)."""
    checks = []
    tolerance = reference["tolerance"]
    for ref in reference["rows"]:
        for batch, figure in ref["img_s"].items():
            row = next((r for r in rows if (r["backend"], r["precision"], r["batch"]) == (ref["backend"],
                        ref["precision"], int(batch)) and r["streams"] == 1 and r["device"] != "cpu"), None)
            check = {"row": f"{ref['backend']} {ref['precision']} b{batch}", "reference_img_s": figure,
                     "reference_method": ref["method"], "img_s": None, "ratio": None, "within": False, "why": None}
            if row is None or row["status"] != "ok":
                check["why"] = "no such row ran here" + (f" ({row['status']}: {row['reason']})" if row else "")
            else:
                check["img_s"], check["ratio"] = row["throughput"], row["throughput"] / figure
                check["within"] = abs(check["ratio"] - 1) <= tolerance
                if environment.get("gpu") != reference["gpu"]:
                    check["why"] = f"another GPU ({environment.get('gpu')}) than the reference's {reference['gpu']}"
                elif ref["tf32"] is not None and ref["tf32"] != row["tf32"]:
                    check["why"] = (f"TF32 {'on' if row['tf32'] else 'off'} here, "
                                    f"{'allowed' if ref['tf32'] else 'off'} in the reference script")
            checks.append(check)
    return checks


def reference_markdown(checks: list[dict], reference: dict) -> str:
    """The comparison as a Markdown section."""
    lines = ["", "## Against the reference script", "", f"Reference: {reference['source']}. "
             f"Within {reference['tolerance']:.0%} or the reason it differs.", "",
             "| row | reference method | reference img/s | here img/s | ratio | within | why not |",
             "|---|---|---:|---:|---:|---|---|"]
    for c in checks:
        here = "" if c["img_s"] is None else f"{c['img_s']:.1f}"
        ratio = "" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        lines.append(f"| {c['row']} | {c['reference_method']} | {c['reference_img_s']} | {here} | {ratio} | "
                     f"{'yes' if c['within'] else 'no'} | {'' if c['within'] else c['why'] or 'unexplained'} |")
    return "\n".join(lines) + "\n"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--input-size", type=int, default=None, help="default: the arch's 224")
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per row")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-tests", action="store_true", help="skip `pytest -m gpu`")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="a narrower matrix (a dry run)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="a narrower matrix (a dry run)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    packages = package_table()
    print("| package | version | needed for |\n|---|---|---|")
    for p in packages:
        print(f"| {p['package']} | {p['version'] or 'MISSING'} | {p['needed_for']} |")
    missing = [p["package"] for p in packages if p["required"] and p["version"] is None]
    if missing:
        print(f"gpu-check cannot run: {', '.join(missing)} missing (every row needs them); install or carry their wheels",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from resnet_export.bench import Settings, gpu_name, parse_batch_sizes, parse_list, run_benchmark
    from resnet_export.manifest import atomic_output, write_json
    from resnet_export.models import load_model

    folder = args.out / f"gpu-{slug(gpu_name() or 'none')}"
    tests = None if args.no_tests else run_gpu_tests()
    size = (args.input_size, args.input_size) if args.input_size else None
    loaded = load_model(arch=args.arch, input_size=size)
    settings = Settings(parse_batch_sizes(args.batch_sizes), warmup=args.warmup, min_time=args.min_time,
                        rounds=args.rounds, cuda_graph=True)
    backends, precisions = parse_list(args.backends, BACKENDS, "backend"), parse_list(args.precisions, PRECISIONS,
                                                                                     "precision")
    paths, _ = run_benchmark(loaded, folder, backends, precisions, settings)
    report = json.loads(paths["report.json"].read_text())
    reference = json.loads(REFERENCE.read_text())
    checks = against_reference(report["rows"], report["environment"], reference)
    report.update(packages=packages, gpu_tests=tests, reference_check=checks)
    write_json(paths["report.json"], report)
    tests_line = f"\n`pytest -m gpu`: {tests['summary']} (exit {tests['exit_code']})\n" if tests else ""
    markdown = paths["report.md"].read_text() + tests_line + reference_markdown(checks, reference)
    with atomic_output(paths["report.md"]) as tmp:
        tmp.write_text(markdown)
    print(markdown)
    print(f"Reports: {', '.join(str(p) for p in paths.values())}")
    if tests and tests["exit_code"] not in (0, 5):  # 5: no test collected
        return 1
    return 3 if any(not c["within"] and not c["why"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
