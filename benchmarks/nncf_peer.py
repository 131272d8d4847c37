"""The toolkit's CPU-target INT8 against NNCF's own post-training quantization, on OpenVINO, in one run.

For the two trained digits models (tests/digits.py) and resnet50 (random weights: speed only), from the
same FP32 ONNX and the same calibration array:

- ``toolkit``: ``quantize_int8(..., target="cpu")`` (ONNX Runtime QDQ, 7-bit per-channel weights);
- ``nncf``: ``nncf.quantize`` on the ONNX model (NNCF's defaults: its own Q/DQ placement for OpenVINO,
  symmetric activations, 8-bit weights with its overflow fix), saved as ONNX;

accuracy on the held-out digits on OpenVINO (and on ONNX Runtime), agreement and min cosine against the
FP32 ONNX, the count of each Q/DQ op, and img/s at batch 1 and 8 on OpenVINO (and ONNX Runtime), every
row timed in the same interleaved rounds.

    .venv/bin/python benchmarks/nncf_peer.py /tmp/peer [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from int8_forms import interleaved_speeds, models, ratio_cells  # noqa: E402
from resnet_export.cpu import cpu_info, describe_cpu  # noqa: E402
from resnet_export.quantize.precision import input_name, quantize_int8  # noqa: E402
from resnet_export.runtime.runners import OpenVinoRunner, OrtRunner  # noqa: E402
from resnet_export.checks.verify import compare
from resnet_export.runtime.batches import run_batches  # noqa: E402

BATCHES = (1, 8)


def nncf_int8(fp32: Path, output: Path, calibration: np.ndarray) -> None:
    """NNCF's post-training quantization of an ONNX model with its defaults, one calibration image a step."""
    import nncf

    name = input_name(fp32)
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))], lambda x: {name: x})
    quantized = nncf.quantize(onnx.load(str(fp32)), dataset, subset_size=len(calibration))
    onnx.save(quantized, str(output))


def qdq_counts(path: Path) -> dict:
    """How many QuantizeLinear / DequantizeLinear nodes a model has, and what the quantized activations feed."""
    graph = onnx.load(str(path), load_external_data=False).graph
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for tensor in node.input:
            consumers[tensor].append(node)
    fed = collections.Counter()
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in {i.name for i in graph.initializer}:
            for consumer in consumers[node.output[0]]:
                fed[consumer.op_type] += 1
    ops = collections.Counter(node.op_type for node in graph.node)
    return {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"],
            "activation DQ feeds": dict(fed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--seconds", type=float, default=4.0, help="per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    threads = cpu_info()["cores"]
    print(f"CPU: {describe_cpu(cpu_info())}, {threads} cores")
    rows = []
    for name, fp32, calibration, inputs in models(args.work):
        sizes = [16] * -(-len(inputs.array) // 16)
        reference = run_batches(OrtRunner(fp32), inputs.array, sizes)
        files = {"toolkit": fp32.with_name(f"{fp32.stem}.int8.toolkit.onnx"),
                 "nncf": fp32.with_name(f"{fp32.stem}.int8.nncf.onnx")}
        quantize_int8(fp32, files["toolkit"], calibration, "cpu")
        nncf_int8(fp32, files["nncf"], calibration)
        runners = {}
        for recipe, path in files.items():
            runners[(recipe, "openvino")] = OpenVinoRunner(path, "int8", threads)
            runners[(recipe, "ort")] = OrtRunner(path, threads=threads)
            for (r, backend), runner in list(runners.items()):
                if r == recipe:
                    metrics = compare(reference, run_batches(runner, inputs.array, sizes), inputs.labels)
                    rows.append({"model": name, "recipe": recipe, "backend": backend, "qdq": qdq_counts(path),
                                 **{k: metrics[k] for k in ("top1_agreement", "min_cosine", "accuracy_candidate",
                                                            "accuracy_reference") if k in metrics}})
        speeds = interleaved_speeds(runners, inputs.array, args.rounds, args.seconds, BATCHES)
        for row in rows:
            if row["model"] == name:
                for batch in BATCHES:
                    row[f"img_s_bs{batch}"] = speeds[(row["recipe"], row["backend"], batch)]
                print(json.dumps(row), flush=True)
    (args.work / "nncf_peer.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The comparison as a Markdown table, with the toolkit/NNCF speed ratio on OpenVINO."""
    head = "| model | recipe | backend | accuracy (FP32) | agreement / min cosine | img/s bs1 | img/s bs8 | vs NNCF on OpenVINO bs1 / bs8 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    peer = {(r["model"]): r for r in rows if r["recipe"] == "nncf" and r["backend"] == "openvino"}
    for r in rows:
        acc = (f"{r['accuracy_candidate']:.2%} ({r['accuracy_reference']:.2%})" if "accuracy_candidate" in r else "-")
        p = peer[r["model"]]
        ratio = ratio_cells(r, p, BATCHES)
        lines.append(f"| {r['model']} | {r['recipe']} | {r['backend']} | {acc} | {r['top1_agreement']:.1%} / "
                     f"{r['min_cosine']:.4f} | {r['img_s_bs1']:.1f} | {r['img_s_bs8']:.1f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
