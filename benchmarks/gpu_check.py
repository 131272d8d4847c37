"""`make gpu-check`: every GPU claim of the toolkit in one command, on one CUDA GPU, with a verdict a script can trust.

In order, the report rewritten after each step and each row group, so a run cut short keeps what it measured:

1. The wheelhouse (``--wheelhouse DIR``, default ./wheelhouse where it exists; ``make wheelhouse`` makes it): every
   piece checked against its sha256, joined, and installed with ``pip --no-index`` into a temporary prefix that only
   this check's processes see. The machine's Python is never changed.
2. The packages, each with its version or the rows it costs; without one every row needs, it stops (exit 2) before
   spending GPU time. No GPU visible: exit 2, unless ``--dry-run``.
3. ``pytest -m gpu`` in a child process: the CUDA seam, PyTorch's and ONNX Runtime's device runners, TensorRT where
   it is installed.
4. The peer (benchmarks/torch_peer.py): a plain PyTorch script, importing nothing from the toolkit, on the same GPU
   in the same run: FP32 as PyTorch defaults, FP16 channels_last, with a CUDA graph, torch.compile at the largest
   batch.
5. The GPU matrix, most valuable row groups first (``VALUE_ORDER``): each row's outputs held to the gate of its
   precision against PyTorch FP32, then timed. ``--budget SECONDS`` drops the least valuable groups first (from
   estimates, then from the clock) and names them.
6. The verdict: each claim held, failed or not checked (with the reason: TensorRT is not installed, a group dropped
   for the budget), and "N of M GPU claims checked, K held". A claim fails when a GPU test fails, a promised row
   errors or is skipped, a row misses its gate, a toolkit PyTorch row is off its peer by more than 10%, or a CUDA-graph
   capture takes memory from the driver. The stored H200 figures (gpu_reference.json) are a sanity line, not a claim.

Exit 0: every checked claim held; 1: a claim failed (each is named); 2: the check cannot run here.

    make wheelhouse                          # where a package index is reachable: wheelhouse/ (pieces <= 60 MB)
    make gpu-check GPU_PYTHON=python3        # on the GPU machine: its own Python, the project on PYTHONPATH
    python benchmarks/gpu_check.py --dry-run --arch resnet18 --input-size 32 --batch-sizes 1,2   # anywhere, no GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "gpu_reference.json"
#: A toolkit PyTorch row and its peer (benchmarks/torch_peer.py) must agree within this share of img/s.
PEER_TOLERANCE = 0.10

#: The row groups, most valuable first: the baseline every speed-up divides by, the engines the toolkit exists for,
#: ONNX Runtime at its best, then the compiled and BF16 PyTorch rows (compiles cost the most time).
VALUE_ORDER = [("torch", "fp32"), ("torch", "fp16"), ("trt", "fp16"), ("trt", "int8"), ("trt", "fp32"),
               ("ort-cuda", "fp16"), ("ort-cuda", "fp32"), ("torch-compile", "fp16"), ("ort-cuda", "int8"),
               ("torch", "bf16"), ("torch-compile", "bf16")]
#: Seconds a group costs beside its timed rows, for resnet50 on a 16-core GPU machine: ESTIMATES, not measured (no
#: GPU was lent when they were written): three inductor compiles (18 s measured at b256 on an H200, issue 30), an
#: FP32 export (5 s on this 2-core machine's neighbour, more with verification), AutoCast, a ModelOpt calibration on
#: the CPU, three TensorRT plan builds.
SETUP_SECONDS = {"torch-compile": 60, ("ort-cuda", "fp32"): 30, ("ort-cuda", "fp16"): 60, ("ort-cuda", "int8"): 120,
                 "trt": 180}
#: Rows a group times per batch (torch FP32: PyTorch's default and strict; ort-cuda: copies, bound, CUDA graph;
#: trt: on the device, CUDA graph, copies).
ROWS_PER_BATCH = {("torch", "fp32"): 2, "ort-cuda": 3, "trt": 3}
#: Estimated seconds of `pytest -m gpu` and of the peer script (resnet50, three batches, one compile).
TESTS_SECONDS, PEER_SECONDS = 90, 60

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
    ("click", ("click",), "the GPU tests (the toolkit's CLI)"),
    ("pytest", ("pytest",), "the GPU tests"),
]
#: Packages only some rows need: without one, those rows are not checked, and the verdict says so.
OPTIONAL = [
    ("modelopt", ("nvidia-modelopt",), "FP16 and INT8 ONNX: ort-cuda fp16/int8, trt fp16/int8"),
    ("tensorrt", ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"), "trt rows"),
]


def version_of(module: str, distributions: tuple[str, ...]) -> str | None:
    """The installed version of ``module`` (from its distribution), or None when it cannot be imported."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
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
    if all(row["version"] for row in rows if row["package"] in ("torch", "onnxruntime")):
        import onnxruntime
        import torch

        rows.append({"package": "CUDA (torch)", "version": torch.version.cuda if torch.cuda.is_available() else None,
                     "needed_for": "every GPU row", "required": False})
        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        rows.append({"package": "ONNX Runtime CUDA provider (onnxruntime-gpu)", "version": "present" if cuda else None,
                     "needed_for": "ort-cuda rows", "required": False})
    return rows


def install_wheelhouse(folder: Path) -> tuple[Path, list[str]]:
    """The wheelhouse in ``folder`` installed into a new temporary prefix, put first on this process's path and on
    its children's (PYTHONPATH); returns the prefix and the wheels."""
    sys.path.insert(0, str(HERE))
    from wheelhouse import install

    prefix = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    wheels = install(folder, prefix)
    sys.path.insert(0, str(prefix))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(prefix), os.environ.get("PYTHONPATH")]))
    return prefix, wheels


def run_gpu_tests() -> dict:
    """``pytest -m gpu`` in a child process with this Python; its exit code, summary line and verdict."""
    child = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                            str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True)
    print(child.stdout[-4000:], child.stderr[-2000:], sep="\n")
    lines = [line for line in child.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {"exit_code": child.returncode, "summary": lines[-1].strip("= ") if lines else "no summary"}


def run_peer(args, out: Path, dry_run_cpu: bool) -> dict | None:
    """benchmarks/torch_peer.py in a child process (the same GPU, or the CPU in a dry run without one); its results,
    or None when it failed (the verdict counts that)."""
    command = [sys.executable, str(HERE / "torch_peer.py"), "--arch", args.arch, "--batch-sizes", args.batch_sizes,
               "--min-time", str(args.min_time), "--warmup", str(args.warmup), "--out", str(out)]
    command += ["--input-size", str(args.input_size)] if args.input_size else []
    command += ["--device", "cpu"] if dry_run_cpu else []
    child = subprocess.run(command, capture_output=True, text=True)
    print(child.stdout, child.stderr[-2000:], sep="\n")
    return json.loads(out.read_text()) if child.returncode == 0 and out.is_file() else None


@dataclass
class Claim:
    """One GPU claim: ``held``, ``failed`` or ``not checked``, and what shows it."""

    claim: str
    status: str
    detail: str = ""


def estimate(group: tuple[str, str], batches: int, min_time: float) -> float:
    """Estimated seconds of one row group: its setup and its timed rows (about ``min_time`` + 1 s each)."""
    backend, _ = group
    setup = SETUP_SECONDS.get(group, SETUP_SECONDS.get(backend, 0))
    rows = ROWS_PER_BATCH.get(group, ROWS_PER_BATCH.get(backend, 1))
    return setup + batches * rows * (min_time + 1.0)


def lacking(groups: list[tuple[str, str]], packages: list[dict]) -> dict[tuple[str, str], str]:
    """The groups this machine cannot run, with the reason: a backend that is not here (TensorRT, ONNX Runtime's
    CUDA provider) or ModelOpt missing for FP16 and INT8 ONNX."""
    from resnet_export.bench.harness import backend_unavailable

    reasons = {}
    modelopt = next(p for p in packages if p["package"] == "modelopt")["version"]
    for backend, precision in groups:
        reason = backend_unavailable(backend) if backend in ("trt", "ort-cuda") else None
        if reason is None and backend in ("trt", "ort-cuda") and precision in ("fp16", "int8") and not modelopt:
            reason = "nvidia-modelopt is not installed (it makes the FP16 and INT8 ONNX; carry it in the wheelhouse)"
        if reason:
            reasons[backend, precision] = reason
    return reasons


def row_claims(rows: list[dict], gpu: str | None, lacks: dict, dropped: dict) -> list[Claim]:
    """Each promised row runs and meets its gate; rows the machine cannot run, or dropped, are not checked."""
    claims = []
    for (backend, precision), reason in {**lacks, **dropped}.items():
        claims.append(Claim(f"{backend} {precision} rows", "not checked", reason))
    for row in rows:
        name = f"{row['backend']} {row['precision']} b{row['batch']}" + (f" ({row['timing']})" if row["timing"] else "")
        if gpu is None:
            claims.append(Claim(name, "not checked", "no CUDA GPU here (a dry run)"))
        elif row["status"] in ("error", "skipped"):
            claims.append(Claim(name, "failed", f"{row['status']}: {row['reason']}"))
        elif row["device"] == gpu:
            verdict = row.get("gate")
            claims.append(Claim(f"{name} meets its {row['precision']} gate against PyTorch FP32",
                                "held" if verdict == "passed" else "failed", verdict or "outputs not checked"))
    return claims


#: Each toolkit PyTorch row and its peer row: (backend, precision, what its timing label holds, peer row name).
PEERS = [("torch", "fp32", "TF32 convolutions (PyTorch's default)", "fp32"),
         ("torch", "fp16", "CUDA graph", "fp16-cl-graph"),
         ("torch-compile", "fp16", "torch.compile", "compile-fp16")]


def peer_claims(rows: list[dict], peer: dict | None) -> list[Claim]:
    """Each toolkit PyTorch row within ``PEER_TOLERANCE`` of the plain script's same row, same batch, same GPU."""
    if peer is None:
        return [Claim("the peer script ran", "failed", "benchmarks/torch_peer.py failed (its output is above)")]
    claims = []
    by_name = {row["name"]: row for row in peer["rows"]}
    for backend, precision, label, name in PEERS:
        for batch, peer_img_s in (by_name.get(name) or {"img_s": {}})["img_s"].items():
            claim = f"{backend} {precision} b{batch} within {PEER_TOLERANCE:.0%} of plain PyTorch ({name})"
            row = next((r for r in rows if (r["backend"], r["precision"], r["batch"], r["streams"]) ==
                        (backend, precision, int(batch), 1) and label in (r["timing"] or "")), None)
            if row is None or row["status"] != "ok":
                claims.append(Claim(claim, "not checked", "the toolkit row did not run" if row is None
                                    else f"the toolkit row {row['status']} (counted above)"))
            elif row["device"] != peer["device"]:
                claims.append(Claim(claim, "not checked", f"the peer ran on {peer['device']}, the row on {row['device']}"))
            else:
                ratio = row["throughput"] / peer_img_s
                claims.append(Claim(claim, "held" if abs(ratio - 1) <= PEER_TOLERANCE else "failed",
                                    f"{row['throughput']:.1f} vs {peer_img_s:.1f} img/s ({ratio:.2f}x)"))
    return claims


def sanity_lines(rows: list[dict], environment: dict, reference: dict) -> list[str]:
    """The stored figures of the reference GPU beside this run's (a sanity line: another GPU differs, no verdict)."""
    lines = []
    for ref in reference["rows"]:
        for batch, figure in ref["img_s"].items():
            row = next((r for r in rows if (r["backend"], r["precision"], r["batch"], r["streams"]) ==
                        (ref["backend"], ref["precision"], int(batch), 1) and r["status"] == "ok"
                        and r["device"] != "cpu" and r.get("tf32") is not False), None)
            here = f"{row['throughput']:.0f} img/s here ({row['throughput'] / figure:.2f}x)" if row else "no row here"
            lines.append(f"{ref['backend']} {ref['precision']} b{batch} ({ref['method']}): {figure} img/s on "
                         f"{reference['gpu']}; {here} on {environment.get('gpu') or 'no GPU'}")
    return lines


class CaptureWatch(logging.Handler):
    """Counts the device's warnings that a capture took memory from the driver."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if "from the driver" in record.getMessage():
            self.messages.append(record.getMessage())


def verdict(claims: list[Claim]) -> str:
    checked = [c for c in claims if c.status != "not checked"]
    held = [c for c in checked if c.status == "held"]
    return f"{len(checked)} of {len(claims)} GPU claims checked, {len(held)} held"


def verdict_markdown(state: dict) -> str:
    """The check's own sections of report.md: packages, GPU tests, plan, claims, the sanity line."""
    lines = ["", "## GPU check", "", f"**{verdict(state['claims'])}**" if state["claims"] else "(running)", "",
             "| package | version | needed for |", "|---|---|---|"]
    lines += [f"| {p['package']} | {p['version'] or 'MISSING'} | {p['needed_for']} |" for p in state["packages"]]
    if state.get("wheelhouse"):
        lines += ["", f"Wheelhouse installed into a temporary prefix: {', '.join(state['wheelhouse'])}"]
    tests = state.get("gpu_tests")
    lines += ["", f"`pytest -m gpu`: {tests['summary']} (exit {tests['exit_code']})" if tests else "`pytest -m gpu`: not run"]
    lines += ["", "Plan (seconds estimated, most valuable first): " + ", ".join(
        f"{b} {p} ~{s:.0f}s" for (b, p), s in state["plan"])]
    lines += ["", "| claim | status | detail |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.status} | {c.detail} |" for c in state["claims"]]
    lines += ["", "Sanity line (another GPU's stored figures, no verdict):", ""]
    lines += [f"- {line}" for line in state.get("sanity", [])]
    lines += ["", f"Wall time of the check: {state['seconds']:.0f} s"]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--input-size", type=int, default=None, help="default: the arch's 224")
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per row")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds the check may take: the least valuable row groups are dropped first")
    parser.add_argument("--wheelhouse", type=Path, default=None, help="default: ./wheelhouse where it exists")
    parser.add_argument("--peer", type=Path, default=None,
                        help="results of benchmarks/torch_peer.py to compare with, instead of running it")
    parser.add_argument("--dry-run", action="store_true", help="run without a GPU (nothing is claimed of one)")
    parser.add_argument("--no-tests", action="store_true", help="skip `pytest -m gpu`")
    parser.add_argument("--backends", default=None, help="only these backends (comma-separated)")
    parser.add_argument("--precisions", default=None, help="only these precisions (comma-separated)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    wheelhouse = args.wheelhouse or (ROOT / "wheelhouse" if (ROOT / "wheelhouse" / "manifest.json").is_file() else None)
    installed = None
    if wheelhouse:
        try:
            _, installed = install_wheelhouse(wheelhouse)
        except Exception as exc:  # a broken or missing piece: nothing can be trusted after it
            print(f"gpu-check cannot run: the wheelhouse {wheelhouse} did not install ({exc})", file=sys.stderr)
            return 2
    packages = package_table()
    print("| package | version | needed for |\n|---|---|---|")
    for p in packages:
        print(f"| {p['package']} | {p['version'] or 'MISSING'} | {p['needed_for']} |")
    missing = [p["package"] for p in packages if p["required"] and p["version"] is None]
    if missing:
        print(f"gpu-check cannot run: {', '.join(missing)} missing (every row needs them); carry their wheels "
              "(make wheelhouse)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from resnet_export.bench.harness import Settings, environment, gpu_name, parse_batch_sizes, weights_kind
    from resnet_export.bench.harness import run_matrix
    from resnet_export.bench.report import write_reports
    from resnet_export.manifest import atomic_output, write_json
    from resnet_export.source.models import load_model

    gpu = gpu_name()
    if gpu is None and not args.dry_run:
        print("gpu-check cannot run: no CUDA GPU is visible here (--dry-run runs it without one, claiming nothing)",
              file=sys.stderr)
        return 2
    folder = args.out / f"gpu-{re.sub(r'[^a-z0-9]+', '-', (gpu or 'none').lower()).strip('-')}"
    folder.mkdir(parents=True, exist_ok=True)
    settings = Settings(parse_batch_sizes(args.batch_sizes), warmup=args.warmup, min_time=args.min_time,
                        rounds=args.rounds, cuda_graph=True)
    groups = [g for g in VALUE_ORDER if (not args.backends or g[0] in args.backends.split(","))
              and (not args.precisions or g[1] in args.precisions.split(","))]
    lacks = lacking(groups, packages)
    budget_left = args.budget - (0 if args.no_tests else TESTS_SECONDS) - (0 if args.peer else PEER_SECONDS)
    plan, dropped = [], {}
    for group in (g for g in groups if g not in lacks):
        seconds = estimate(group, len(settings.batch_sizes), args.min_time)
        if seconds <= budget_left:
            plan.append((group, seconds))
            budget_left -= seconds
        else:
            dropped[group] = f"dropped for --budget {args.budget:.0f} s (estimated {seconds:.0f} s)"
    watch = CaptureWatch()
    logging.getLogger("resnet_export.runtime.device").addHandler(watch)
    env = environment(settings)
    reference = json.loads(REFERENCE.read_text())
    loaded = load_model(arch=args.arch, input_size=(args.input_size,) * 2 if args.input_size else None)
    state = {"packages": packages, "wheelhouse": installed, "gpu_tests": None, "peer": None, "plan": plan,
             "claims": [], "seconds": 0.0}
    rows: list = []  # the matrix's Rows so far

    def write(final: bool = False) -> dict:
        state["seconds"] = time.monotonic() - started
        state["sanity"] = sanity_lines([asdict(r) for r in rows], env, reference)
        state["claims"] = judge() if final else []
        paths = write_reports(rows, env, loaded.name, folder, weights=weights_kind(loaded))
        report = json.loads(paths["report.json"].read_text())
        report["gpu_check"] = {**{k: v for k, v in state.items() if k != "claims"},
                               "claims": [asdict(c) for c in state["claims"]],
                               "verdict": verdict(state["claims"]) if final else "running",
                               "timing_method": getattr(_device(), "TIMING", None)}
        write_json(paths["report.json"], report)
        with atomic_output(paths["report.md"]) as tmp:
            tmp.write_text(paths["report.md"].read_text() + verdict_markdown(state))
        return paths

    def judge() -> list[Claim]:
        claims = []
        tests = state["gpu_tests"]
        if tests is not None:
            ran = re.search(r"(\d+) passed", tests["summary"])
            status = ("failed" if tests["exit_code"] != 0 else "held" if ran
                      else "not checked")  # every GPU test skipped: nothing was shown
            claims.append(Claim("pytest -m gpu", status, f"{tests['summary']} (exit {tests['exit_code']})"))
        measured = [asdict(r) for r in rows]
        claims += row_claims(measured, gpu, lacks, dropped)
        claims += peer_claims(measured, state["peer"])
        if gpu is not None:
            claims.append(Claim("no CUDA-graph capture took memory from the driver",
                                "failed" if watch.messages else "held", "; ".join(watch.messages[:3])))
        return claims

    write()
    if not args.no_tests:
        state["gpu_tests"] = run_gpu_tests()
        write()
    state["peer"] = (json.loads(args.peer.read_text()) if args.peer
                     else run_peer(args, folder / "peer.json", dry_run_cpu=gpu is None or _device().torch_device == "cpu"))
    write()

    def after_each(new_rows) -> bool:
        rows[:] = new_rows
        write()
        measured = {(r.backend, r.precision) for r in rows}
        left = [(g, s) for g, s in plan if g not in measured]
        if left and time.monotonic() - started + left[0][1] > args.budget:  # the clock ran past the estimates
            for group, seconds in left:
                dropped[group] = f"dropped: the --budget of {args.budget:.0f} s ran out (estimated {seconds:.0f} s)"
            return False
        return True

    if plan:
        run_matrix(loaded, (), (), settings, folder / "artifacts", order=[g for g, _ in plan], after_each=after_each)
    paths = write(final=True)
    markdown = paths["report.md"].read_text()
    print(markdown)
    print(f"Reports: {', '.join(str(p) for p in paths.values())}")
    failed = [c for c in state["claims"] if c.status == "failed"]
    for claim in failed:
        print(f"FAILED: {claim.claim}: {claim.detail}", file=sys.stderr)
    print(verdict(state["claims"]))
    return 1 if failed else 0


def _device():
    from resnet_export.runtime import device

    return device.current()


if __name__ == "__main__":
    sys.exit(main())
