"""A plain PyTorch benchmark of a torchvision ResNet: the peer `make gpu-check` holds the toolkit's PyTorch rows to.

It imports nothing from resnet_export: it measures what a PyTorch user's own script gets on this GPU, in the same run
as the toolkit, so that the check means the same on an H100, an H200 or an L4. Rows (inputs on the device):

- ``fp32``: eager NCHW, as PyTorch runs FP32 by default (cuDNN may use TF32 for convolutions; matmuls stay FP32);
- ``fp16-cl``: FP16 channels_last, eager;
- ``fp16-cl-graph``: FP16 channels_last replaying a CUDA graph (``torch.cuda.graph``, after a warm-up);
- ``compile-fp16``: ``torch.compile`` (inductor) FP16 channels_last, at the largest batch only (its compile time
  is reported apart).

Timing: CUDA events around a loop of calls after a warm-up, the loop running at least ``--min-time`` seconds. With
``--device cpu`` (a dry run on a machine without a GPU) only ``fp32`` runs, timed by the wall clock.

    python benchmarks/torch_peer.py --arch resnet50 --batch-sizes 1,32,256 --out peer.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torchvision


def timed_loop(call, seconds: float, cuda: bool) -> float:
    """Seconds per call: calls repeated until ``seconds`` have passed, timed by CUDA events around the loop (GPU) or
    the wall clock (CPU)."""
    calls, start_wall = 0, time.perf_counter()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    while calls < 3 or time.perf_counter() - start_wall < seconds:
        call()
        calls += 1
    if cuda:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    return (time.perf_counter() - start_wall) / calls


def variants(model: torch.nn.Module, batch: int, largest: bool, cuda: bool, size: tuple[int, int]):
    """(name, method, call, compile seconds) of each row this batch runs, each on its own copy of ``model``."""
    device = "cuda" if cuda else "cpu"
    x32 = torch.randn(batch, 3, *size, device=device)
    fp32 = copy.deepcopy(model).to(device)
    yield "fp32", "eager NCHW FP32, PyTorch's default TF32 (convolutions)", lambda: fp32(x32), None
    if not cuda:
        return
    half = copy.deepcopy(model).to(device).half().to(memory_format=torch.channels_last)
    x16 = x32.half().contiguous(memory_format=torch.channels_last)
    yield "fp16-cl", "FP16 channels_last eager", lambda: half(x16), None
    static_in = x16.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            half(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        half(static_in)
    yield "fp16-cl-graph", "FP16 channels_last, CUDA graph", graph.replay, None
    if largest:
        compiled = torch.compile(half, backend="inductor", dynamic=False)
        start = time.perf_counter()
        compiled(x16)
        torch.cuda.synchronize()
        yield "compile-fp16", "torch.compile FP16 channels_last", lambda: compiled(x16), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per row")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible (torch.cuda.is_available() is False); --device cpu for a dry run")
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)().eval()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows: dict[str, dict] = {}
    with torch.inference_mode():
        for batch in batches:
            for name, method, call, compile_s in variants(model, batch, batch == max(batches), cuda,
                                                           (args.input_size, args.input_size)):
                for _ in range(args.warmup):
                    call()
                if cuda:
                    torch.cuda.synchronize()
                seconds = timed_loop(call, args.min_time, cuda)
                row = rows.setdefault(name, {"name": name, "method": method, "img_s": {}, "compile_s": None})
                row["img_s"][str(batch)] = batch / seconds
                row["compile_s"] = compile_s if compile_s is not None else row["compile_s"]
                print(f"{name:14s} b{batch:<4d} {batch / seconds:10.1f} img/s  ({method})", flush=True)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "clock": "CUDA events around a loop of calls" if cuda else "wall clock around a loop of calls",
              "arch": args.arch, "input_size": args.input_size, "torch": torch.__version__,
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "rows": list(rows.values())}
    with open(args.out, "w") as file:
        json.dump(result, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
