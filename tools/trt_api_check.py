"""Check the toolkit's GPU modules against the real TensorRT Python bindings of several versions (API only).

For each VERSION: the real bindings wheel, imported over a shim whose factories return NULL
(tools/trt_api.sh: names, signatures, enums and docstrings, nothing that builds or runs), gets .pyi
stubs from pybind11-stubgen, plus two facts the bindings' own docstrings state and the generated
signatures miss. Then pyright checks the GPU modules with those stubs, and once with a stand-in
``tensorrt`` whose every name is ``Any``: what is reported only with the real stubs is a TensorRT API
error (a removed flag, a renamed method, a wrong keyword), whatever else pyright says of the code.

Usage: python tools/trt_api_check.py [--stubs-only] CACHE_DIR VERSION...   (`make api-check`)
Stubs are cached as CACHE_DIR/VERSION/stubs/tensorrt/*.pyi (tests/engine/test_trt_double.py reads them too).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The modules that call TensorRT or the CUDA seam under it.
MODULES = ["engine/tensorrt.py", "engine/build.py", "engine/runner.py", "engine/inspector.py", "runtime/device.py",
           "runtime/device_runners.py", "runtime/runners.py", "bench/harness.py", "deploy/triton.py",
           "deploy/describe.py", "deploy/inference.py", "pipeline/engine.py", "pipeline/artifact.py"]


def stubs(cache: Path, version: str) -> Path:
    """The stubs folder of ``version`` (holding ``tensorrt/``), made once and kept under ``cache``."""
    folder = cache / version
    out = folder / "stubs"
    if (out / "tensorrt" / "tensorrt.pyi").is_file():
        return out
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "tools" / "trt_api.sh"), version, str(folder)], check=True, env=env)
    work = folder / "stubs.partial"
    env.update(LD_LIBRARY_PATH=str(folder / "lib"), PYTHONPATH=str(folder / "shim"))
    subprocess.run([sys.executable, "-m", "pybind11_stubgen", "tensorrt", "-o", str(work)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pyi = work / "tensorrt" / "tensorrt.pyi"
    pyi.write_text(add_documented_conversions(pyi.read_text()))
    work.rename(out)
    return out


def add_documented_conversions(text: str) -> str:
    """What the bindings document and pybind11-stubgen cannot see in signatures:

    - ``Dims``: "behave like Python tuples ... the TensorRT API can implicitly convert Python iterables
      to Dims objects, so tuple or list can be used in place of this class" (its docstring): parameters
      typed ``Dims`` take sequences of ints, and a ``Dims`` iterates;
    - ``IHostMemory``: "exposes a buffer interface using Python's buffer protocol" (its docstring).
    """
    sequence = ": Dims | collections.abc.Sequence[typing.SupportsInt]"
    text = "\n".join(re.sub(r": Dims(?=[,)])", sequence, line) if line.lstrip().startswith("def ") else line
                     for line in text.splitlines())
    text = text.replace("class Dims:\n", "class Dims:\n    def __iter__(self) -> collections.abc.Iterator[int]: ...\n", 1)
    text = text.replace("class IHostMemory:\n",
                        "class IHostMemory:\n    def __buffer__(self, flags: int, /) -> memoryview: ...\n", 1)
    return text.replace("from __future__ import annotations\n", "from __future__ import annotations\nimport collections.abc\n", 1)


def diagnostics(stub_path: Path) -> set[tuple[str, int, str]]:
    """pyright's errors on the GPU modules with ``stub_path`` first on the stub search path."""
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "pyrightconfig.json"
        config.write_text(json.dumps({"stubPath": str(stub_path), "typeCheckingMode": "basic",
                                      "pythonVersion": f"{sys.version_info.major}.{sys.version_info.minor}"}))
        files = [str(ROOT / "resnet_export" / m) for m in MODULES]
        run = subprocess.run([sys.executable, "-m", "pyright", "-p", str(config), "--pythonpath", sys.executable,
                              "--outputjson", *files], capture_output=True, text=True)
    try:
        report = json.loads(run.stdout)
    except ValueError:
        sys.exit(f"pyright gave no report: {run.stderr.strip() or run.stdout.strip()}")
    return {(Path(d["file"]).relative_to(ROOT).as_posix(), d["range"]["start"]["line"] + 1, d["message"])
            for d in report["generalDiagnostics"] if d["severity"] == "error"}


def any_tensorrt(folder: Path) -> Path:
    """A stand-in ``tensorrt`` stub whose every name is ``Any``: the baseline to subtract."""
    (folder / "tensorrt").mkdir(parents=True)
    (folder / "tensorrt" / "__init__.pyi").write_text(
        "from typing import Any\n__version__: str\ndef __getattr__(name: str) -> Any: ...\n")
    return folder


def main(argv: list[str]) -> int:
    stubs_only = argv[:1] == ["--stubs-only"]
    cache, versions = Path(argv[int(stubs_only)]).resolve(), argv[int(stubs_only) + 1:]
    folders = {version: stubs(cache, version) for version in versions}
    if stubs_only:
        return 0
    with tempfile.TemporaryDirectory() as work:
        baseline = diagnostics(any_tensorrt(Path(work)))
    failed = False
    for version, folder in folders.items():
        errors = sorted(diagnostics(folder) - baseline)
        print(f"TensorRT {version}: {len(errors)} API error(s) in resnet_export/{{{','.join(MODULES)}}}")
        for path, line, message in errors:
            print(f"  {path}:{line}: {message.splitlines()[0]}")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
