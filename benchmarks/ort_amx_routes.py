"""Routes to put ONNX Runtime's CPU-target INT8 convolutions on AMX, against OpenVINO, in one run.

ONNX Runtime runs a ``QLinearConv`` whose int8 weights have zero point 0 (what ``--target cpu`` writes) with
``MlasConvSym``, which has AVX2/AVX-512/VNNI kernels and no AMX one; a non-zero weight zero point makes it
take ``MlasGemm`` (U8S8), which dispatches to AMX (qlinearconv.cc ``TryConvSymPrepack``; platform.cpp).
Each route, from the toolkit's own CPU-target INT8 (7-bit weights, the ``portable`` form):

- ``zp0``: the artifact as written;
- ``zp1``: every conv's weights shifted by +1 with zero point 1 (the same dequantized values);
- ``zp1 K>=512``: only the convs whose reduction (in channels x kernel) is at least 512 shifted;
- ``zp0, no prepacking``: the artifact with ONNX Runtime's ``session.disable_prepacking``.

For the two trained digits models (tests/digits.py) and resnet50 (random weights): accuracy and agreement
against the FP32 ONNX on ONNX Runtime and OpenVINO, ONNX Runtime's fused run against the same graph run
exactly, the same under QEMU emulating a Haswell (``--emulate-avx2``: AVX2 only, accuracy only, for the
trained models: resnet50 takes most of an hour emulated), and img/s at batch 1 and 8, every row timed in
the same interleaved rounds. ``--only TEXT`` measures only the models whose name holds TEXT.

    .venv/bin/python benchmarks/ort_amx_routes.py /tmp/routes [--emulate-avx2] [--seconds 3] [--rounds 3] [--only resnet50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from int8_forms import emulated_avx2_runs, interleaved_speeds, models, ratio_cells  # noqa: E402
from resnet_export.cpu import cpu_info, describe_cpu  # noqa: E402
from resnet_export.quantize.precision import quantize_int8  # noqa: E402
from resnet_export.runtime.runners import OpenVinoRunner, OrtRunner  # noqa: E402
from resnet_export.checks.verify import compare
from resnet_export.runtime.batches import run_batches  # noqa: E402

BATCHES = (1, 8)


def shift_weights(source: Path, output: Path, min_reduction: int = 0) -> int:
    """Write ``source`` with each quantized conv weight (reduction >= ``min_reduction``) shifted by +1 and its
    zero point set to 1: the dequantized weights are unchanged. Returns how many convs were shifted."""
    model = onnx.load(str(source))
    inits = {init.name: init for init in model.graph.initializer}
    shifted = 0
    for node in model.graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is None or len(weight.dims) != 4 or int(np.prod(weight.dims[1:])) < min_reduction:
            continue
        w, zero_point = numpy_helper.to_array(weight), numpy_helper.to_array(inits[node.input[2]])
        if w.dtype != np.int8 or zero_point.any() or w.max() == 127:
            continue
        weight.CopyFrom(numpy_helper.from_array((w + 1).astype(np.int8), weight.name))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(np.ones_like(zero_point), node.input[2]))
        shifted += 1
    onnx.save(model, str(output))
    return shifted


class UnpackedOrt(OrtRunner):
    """ONNX Runtime with ``session.disable_prepacking``: the weights stay unpacked and convs run through GEMM."""

    def __init__(self, path: Path, threads: int):
        super().__init__(path, threads=threads)
        self.options.add_session_config_entry("session.disable_prepacking", "1")
        self.session = self._session(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--emulate-avx2", action="store_true")
    parser.add_argument("--seconds", type=float, default=3.0, help="per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="measure only the models whose name holds this text")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    qemu = shutil.which("qemu-x86_64") if args.emulate_avx2 else None
    threads = cpu_info()["cores"]
    print(f"CPU: {describe_cpu(cpu_info())}, {threads} cores")
    rows = []
    for name, fp32, calibration, inputs in models(args.work):
        if args.only not in name:
            continue
        sizes = [16] * -(-len(inputs.array) // 16)
        reference = run_batches(OrtRunner(fp32), inputs.array, sizes)
        base = fp32.with_name(f"{fp32.stem}.int8.zp0.onnx")
        quantize_int8(fp32, base, calibration, "cpu")
        files = {"zp0": base, "zp1": base.with_name(f"{fp32.stem}.int8.zp1.onnx"),
                 "zp1 K>=512": base.with_name(f"{fp32.stem}.int8.zp1-k512.onnx")}
        shifted = {"zp0": 0, "zp1": shift_weights(base, files["zp1"]),
                   "zp1 K>=512": shift_weights(base, files["zp1 K>=512"], 512)}
        runners = {}
        for route, path in files.items():
            runners[(route, "ort")] = OrtRunner(path, threads=threads)
            runners[(route, "openvino")] = OpenVinoRunner(path, "int8", threads)
        runners[("zp0, no prepacking", "ort")] = UnpackedOrt(base, threads)
        exact = {route: run_batches(OrtRunner(path, exact=True), inputs.array, sizes) for route, path in files.items()}
        emulated = (emulated_avx2_runs(qemu, args.work, inputs.array[:64], [str(p) for p in files.values()])
                    if qemu and inputs.labels is not None else {})
        model_rows = []
        for (route, backend), runner in runners.items():
            out = run_batches(runner, inputs.array, sizes)
            metrics = compare(reference, out, inputs.labels)
            path = files.get(route, base)
            row = {"model": name, "route": route, "backend": backend, "convs shifted": shifted.get(route, 0),
                   **{k: metrics[k] for k in ("top1_agreement", "min_cosine", "accuracy_candidate") if k in metrics}}
            if backend == "ort":
                row["fused vs exact"] = compare(exact[route.split(",")[0]], out)["min_cosine"]
                if str(path) in emulated:
                    fused, exact_avx2 = emulated[str(path)]
                    row["avx2 fused vs exact"] = compare(exact_avx2, fused)["min_cosine"]
                    if inputs.labels is not None:
                        row["avx2 accuracy"] = compare(reference[:64], fused, inputs.labels[:64])["accuracy_candidate"]
            model_rows.append(row)
        speeds = interleaved_speeds(runners, inputs.array, args.rounds, args.seconds, BATCHES)
        for row in model_rows:
            for batch in BATCHES:
                row[f"img_s_bs{batch}"] = speeds[(row["route"], row["backend"], batch)]
            print(json.dumps(row), flush=True)
        rows += model_rows
    (args.work / "ort_amx_routes.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The routes as a Markdown table, each row's speed also as a ratio to OpenVINO on the artifact as written."""
    head = ("| model | route | backend | accuracy | agreement / min cosine | fused vs exact | AVX2 (QEMU): fused vs exact, "
            "accuracy | img/s bs1 | img/s bs8 | vs OpenVINO zp0 bs1 / bs8 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    peer = {r["model"]: r for r in rows if r["route"] == "zp0" and r["backend"] == "openvino"}
    for r in rows:
        p = peer[r["model"]]
        acc = f"{r['accuracy_candidate']:.2%}" if "accuracy_candidate" in r else "-"
        kernels = f"{r['fused vs exact']:.5f}" if "fused vs exact" in r else "-"
        avx2 = (f"{r['avx2 fused vs exact']:.5f}" + (f", {r['avx2 accuracy']:.1%}" if "avx2 accuracy" in r else "")
                if "avx2 fused vs exact" in r else "-")
        ratio = ratio_cells(r, p, BATCHES)
        lines.append(f"| {r['model']} | {r['route']} | {r['backend']} | {acc} | {r['top1_agreement']:.1%} / "
                     f"{r['min_cosine']:.4f} | {kernels} | {avx2} | {r['img_s_bs1']:.1f} | {r['img_s_bs8']:.1f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
