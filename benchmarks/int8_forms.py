"""CPU-target INT8 weight forms, before (8-bit, ``--cpu vnni``) and after (7-bit, ``--cpu portable``).

For the two trained digits models (tests/digits.py) and resnet50 (random weights: speed and kernel
fidelity only), on this machine and, with ``--emulate-avx2``, on ONNX Runtime's real AVX2 kernels
under QEMU emulating a Haswell (no VNNI; needs ``apt-get install qemu-user``; accuracy only, its
speed means nothing):

- accuracy of FP32 and of each form's fused run on held-out digits, agreement and min cosine against
  FP32, and the fused run against the same graph run exactly (graph optimizations off);
- img/s at batch 1 and 8 for each form on ONNX Runtime and on OpenVINO, the same file, in one run.

    .venv/bin/python benchmarks/int8_forms.py /tmp/forms [--emulate-avx2] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnet_export.cpu import cpu_info, describe_cpu  # noqa: E402
from resnet_export.data import calibration_data, image_inputs, random_inputs  # noqa: E402
from resnet_export.source.models import load_model  # noqa: E402
from resnet_export.pipeline import onnx_from_model  # noqa: E402
from resnet_export.quantize.precision import quantize_int8  # noqa: E402
from resnet_export.runtime.runners import OpenVinoRunner, OrtRunner  # noqa: E402
from resnet_export.checks.verify import compare
from resnet_export.runtime.batches import run_batches  # noqa: E402
from tests.digits import DIGITS_RESNET, RESNET18, train_digits, write_digit_images  # noqa: E402

FORMS = ("vnni", "portable")  # before, after
EMULATED = """
import json, sys
import numpy as np
import onnxruntime as ort
x = np.load(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    runs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        runs.append(np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 16]})[0]
                                    for i in range(0, len(x), 16)]).tolist())
    out[path] = runs
print(json.dumps(out))
"""


def emulated_avx2_runs(qemu: str, work: Path, x: np.ndarray, paths: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each ONNX file's (fused, exact) outputs on ``x`` from ONNX Runtime run under QEMU emulating a Haswell."""
    np.save(work / "emulated_inputs.npy", x)
    (work / "emulated.py").write_text(EMULATED)
    done = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, str(work / "emulated.py"),
                           str(work / "emulated_inputs.npy"), *paths], capture_output=True, text=True, check=True)
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    return {path: tuple(np.asarray(a) for a in runs[path]) for path in paths}


def images_per_second(runner, x: np.ndarray, seconds: float) -> float:
    runner.infer(x)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.infer(x)
        count += 1
    return count * len(x) / (time.perf_counter() - start)


def interleaved_speeds(runners: dict, array: np.ndarray, rounds: int, seconds: float,
                       batches: tuple[int, ...] = (1, 8)) -> dict:
    """Median img/s of each runner at each batch size, ``{(*key, batch): img/s}``, timed in interleaved rounds
    (each round times every runner in turn), so a slow spell of the machine falls on every runner alike."""
    speeds: dict = {}
    for _ in range(rounds):
        for batch in batches:
            x = array[:batch] if len(array) >= batch else np.repeat(array[:1], batch, 0)
            for key, runner in runners.items():
                speeds.setdefault((*key, batch), []).append(images_per_second(runner, x, seconds))
    return {key: float(np.median(values)) for key, values in speeds.items()}


def ratio_cells(row: dict, peer: dict, batches: tuple[int, ...] = (1, 8)) -> str:
    """``row``'s img/s over ``peer``'s at each batch size, as ``1.02x / 0.95x``."""
    return " / ".join(f"{row[f'img_s_bs{b}'] / peer[f'img_s_bs{b}']:.2f}x" for b in batches)


def models(work: Path):
    """(name, loaded model, FP32 ONNX, calibration array, evaluation Inputs) for each model measured."""
    train, val = write_digit_images(work / "digits")
    for name, source in (("digits ResNet (tests/user_models.py)", DIGITS_RESNET), ("ResNet-18, digits", RESNET18)):
        folder = work / name.split()[0].lower().replace(",", "")
        folder.mkdir(exist_ok=True)
        train_digits(train, folder / "w.pth", source=source)
        loaded = load_model(**source, weights=str(folder / "w.pth"))
        fp32 = onnx_from_model(loaded, folder / "fp32.onnx", images=val).path
        calibration = calibration_data(train, loaded.preprocessing, 256, 0, held_out=False)[0].array
        yield name, fp32, calibration, image_inputs(val, loaded.preprocessing)
    loaded = load_model(arch="resnet50")
    fp32 = onnx_from_model(loaded, work / "resnet50.onnx", run_verification=False).path
    yield ("resnet50 (random weights)", fp32, random_inputs(loaded.preprocessing, 64, 1).array,
           random_inputs(loaded.preprocessing, 16, 2))  # 16: under emulation each image takes seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--emulate-avx2", action="store_true")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    qemu = shutil.which("qemu-x86_64") if args.emulate_avx2 else None
    print(f"CPU: {describe_cpu(cpu_info())}, {cpu_info()['cores']} cores")
    rows = []
    for name, fp32, calibration, inputs in models(args.work):
        reference = run_batches(OrtRunner(fp32), inputs.array, [16] * -(-len(inputs.array) // 16))
        labels = inputs.labels
        for form in FORMS:
            path = fp32.with_name(f"{fp32.stem}.int8.{form}.onnx")
            quantize_int8(fp32, path, calibration, "cpu", cpu_form=form)
            sizes = [16] * -(-len(inputs.array) // 16)
            fused = run_batches(OrtRunner(path), inputs.array, sizes)
            exact = run_batches(OrtRunner(path, exact=True), inputs.array, sizes)
            row = {"model": name, "form": form, "here": compare(reference, fused, labels),
                   "here_kernels": compare(exact, fused)["min_cosine"], "path": str(path)}
            ort_runner, ov_runner = OrtRunner(path, threads=cpu_info()["cores"]), OpenVinoRunner(path, "int8", cpu_info()["cores"])
            for batch in (1, 8):
                x = inputs.array[:batch] if len(inputs.array) >= batch else np.repeat(inputs.array[:1], batch, 0)
                row[f"ort_bs{batch}"] = images_per_second(ort_runner, x, args.seconds)
                row[f"openvino_bs{batch}"] = images_per_second(ov_runner, x, args.seconds)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "here"} | {"here": {
                k: row["here"][k] for k in ("top1_agreement", "min_cosine", "accuracy_candidate", "accuracy_reference")
                if k in row["here"]}}), flush=True)
        if qemu:
            forms = [r for r in rows if r["model"] == name]
            runs = emulated_avx2_runs(qemu, args.work, inputs.array[:64], [r["path"] for r in forms])
            ref = reference[:64]
            for r in forms:
                fused_avx2, exact_avx2 = runs[r["path"]]
                r["avx2"] = compare(ref, fused_avx2, None if labels is None else labels[:64])
                r["avx2_kernels"] = compare(exact_avx2, fused_avx2)["min_cosine"]
                print(name, r["form"], "emulated AVX2:", {k: r["avx2"][k] for k in ("top1_agreement", "min_cosine")},
                      "fused vs exact", r["avx2_kernels"], flush=True)
    (args.work / "int8_forms.json").write_text(json.dumps(rows, indent=1, default=float))
    print(markdown(rows, qemu is not None))


def markdown(rows: list[dict], emulated: bool) -> str:
    head = ("| model | form | accuracy (FP32) | agreement / min cosine here | fused vs exact here |"
            + (" agreement / min cosine, AVX2 | fused vs exact, AVX2 |" if emulated else "")
            + " ORT bs1 | OV bs1 | ORT/OV bs1 | ORT bs8 | OV bs8 | ORT/OV bs8 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        h = r["here"]
        acc = (f"{h['accuracy_candidate']:.2%} ({h['accuracy_reference']:.2%})" if "accuracy_candidate" in h else "-")
        cells = [r["model"], f"{r['form']} ({7 if r['form'] == 'portable' else 8}-bit)", acc,
                 f"{h['top1_agreement']:.1%} / {h['min_cosine']:.4f}", f"{r['here_kernels']:.5f}"]
        if emulated:
            a = r["avx2"]
            acc_avx2 = f", acc {a['accuracy_candidate']:.1%}" if "accuracy_candidate" in a else ""
            cells += [f"{a['top1_agreement']:.1%} / {a['min_cosine']:.4f}{acc_avx2}", f"{r['avx2_kernels']:.5f}"]
        for batch in (1, 8):
            o, v = r[f"ort_bs{batch}"], r[f"openvino_bs{batch}"]
            cells += [f"{o:.1f}", f"{v:.1f}", f"{o / v:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
