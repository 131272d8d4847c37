"""The wheels `make gpu-check` needs beyond a GPU image, carried to a machine that has no package index.

``collect`` (``make wheelhouse``, on a machine with a package index and this project's .venv): the distributions
gpu-check needs (``ROOTS``) and everything they require, at the versions this .venv runs (the tested set), less what
a GPU image already has (``gpu_image_packages.txt``), downloaded as wheels for that image's Python and platform
(``pip download --no-deps --only-binary=:all:``; a pure-Python package published as an sdist only is built into a
wheel here), listed in ``manifest.json`` with their sha256, and any wheel over ``--piece-mb`` split into pieces of at
most that size (for transfers that cap a file's size), each piece with its own sha256.

``install`` (gpu-check, on the GPU machine): every piece and wheel checked against the manifest, the pieces joined, and
the wheels installed with ``pip install --no-index --no-deps --target PREFIX`` into a temporary prefix that only the
check's processes see: the machine's Python is never changed.

    python benchmarks/wheelhouse.py collect wheelhouse --python-version 3.12 --piece-mb 60
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: What gpu-check imports beyond a GPU image: ONNX Runtime's CUDA provider (ort-cuda rows, the CUDA provider test) and
#: ModelOpt with what the toolkit's FP16 and INT8 ONNX need (precision.py).
ROOTS = ("onnxruntime-gpu", "nvidia-modelopt", "onnx-graphsurgeon", "polygraphy", "onnxconverter-common", "onnxslim",
         "cppimport", "lief")
#: The manylinux tags pip matches for an x86_64 GPU machine (pip matches each exactly).
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_34_x86_64", "manylinux_2_35_x86_64", "manylinux1_x86_64", "linux_x86_64")


class WheelhouseError(Exception):
    """A wheelhouse that cannot be collected or installed (the message says which file and why)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = HERE / "gpu_image_packages.txt") -> set[str]:
    """The distributions the GPU image has, by canonical name."""
    return {canonical(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def needed(roots=ROOTS, have: set[str] | None = None) -> dict[str, str]:
    """``{name: version}`` of ``roots`` and everything they require (extras aside), as installed in this Python, less
    what the image has."""
    have = image_packages() if have is None else have
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in found or name in have:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError as exc:
            raise WheelhouseError(f"{name} is not installed in this Python ({sys.executable}): run `make install` "
                                  "first, so the wheelhouse holds the versions the suite tested") from exc
        for requirement in metadata.requires(name) or []:
            if "extra ==" not in requirement:
                todo.append(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))
    return dict(sorted(found.items()))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, version: str, folder: Path, python_version: str) -> Path:
    """The wheel of ``name==version`` for the GPU image's Python and platform, downloaded (or built from its sdist
    where it has no wheel, which pip then requires to be pure Python)."""
    before = set(folder.iterdir())
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "-d", str(folder)]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    if subprocess.run([*command, f"{name}=={version}"], capture_output=True, text=True).returncode != 0:
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(folder),
                                f"{name}=={version}"], capture_output=True, text=True)
        if built.returncode != 0:
            raise WheelhouseError(f"no wheel of {name}=={version} for Python {python_version}: {built.stderr.strip()}")
    new = sorted(set(folder.iterdir()) - before)
    wheels = [path for path in new if path.suffix == ".whl"]
    if len(wheels) != 1:
        raise WheelhouseError(f"{name}=={version}: expected one wheel, got {[p.name for p in new]}")
    return wheels[0]


def split(wheel: Path, piece_bytes: int) -> list[dict]:
    """``wheel`` cut into ``wheel.partNNN`` files of at most ``piece_bytes`` (the wheel itself removed); their names
    and sha256."""
    pieces = []
    with open(wheel, "rb") as file:
        while block := file.read(piece_bytes):
            piece = wheel.with_name(f"{wheel.name}.part{len(pieces):03d}")
            piece.write_bytes(block)
            pieces.append({"file": piece.name, "sha256": hashlib.sha256(block).hexdigest()})
    wheel.unlink()
    return pieces


def collect(folder: Path, python_version: str, piece_mb: int) -> dict:
    """Download every needed wheel into ``folder`` (emptied first), split the large ones, write manifest.json."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    wheels = []
    for name, version in needed().items():
        wheel = download(name, version, folder, python_version)
        entry = {"name": name, "version": version, "file": wheel.name, "sha256": sha256(wheel),
                 "bytes": wheel.stat().st_size, "pieces": None}
        if entry["bytes"] > piece_mb * 2**20:
            entry["pieces"] = split(wheel, piece_mb * 2**20)
        wheels.append(entry)
        print(f"{wheel.name}: {entry['bytes'] / 2**20:.1f} MB" + (f" in {len(entry['pieces'])} pieces"
                                                                     if entry["pieces"] else ""), flush=True)
    manifest = {"python_version": python_version, "piece_mb": piece_mb, "roots": list(ROOTS), "wheels": wheels}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def assemble(folder: Path, into: Path) -> list[Path]:
    """Every wheel of the wheelhouse in ``folder``, checked against its manifest, joined from its pieces where it was
    split, written under ``into``; a missing or altered file is a WheelhouseError naming it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    wheels = []
    for entry in manifest["wheels"]:
        target = into / entry["file"]
        parts = entry["pieces"] or [{"file": entry["file"], "sha256": entry["sha256"]}]
        with open(target, "wb") as out:
            for part in parts:
                path = folder / part["file"]
                if not path.is_file():
                    raise WheelhouseError(f"{path} is missing (the wheelhouse lists it)")
                if sha256(path) != part["sha256"]:
                    raise WheelhouseError(f"{path} does not match its sha256 in manifest.json (a broken transfer?)")
                out.write(path.read_bytes())
        if sha256(target) != entry["sha256"]:
            raise WheelhouseError(f"{entry['file']} joined from its pieces does not match its sha256")
        wheels.append(target)
    return wheels


def install(folder: Path, prefix: Path) -> list[str]:
    """Install the wheelhouse in ``folder`` into ``prefix`` (nothing else changes); returns the wheels' names."""
    with tempfile.TemporaryDirectory() as joined:
        wheels = assemble(folder, Path(joined))
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                               "--no-compile", "--target", str(prefix), *map(str, wheels)], capture_output=True, text=True)
        if done.returncode != 0:
            raise WheelhouseError(f"pip could not install the wheelhouse into {prefix}: {done.stderr.strip()[-500:]}")
        return [wheel.name for wheel in wheels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("collect", help="download the wheels (make wheelhouse)")
    make.add_argument("folder", type=Path)
    make.add_argument("--python-version", default="3.12", help="the GPU image's Python (3.12.3 on the lent image)")
    make.add_argument("--piece-mb", type=int, default=60, help="split wheels larger than this")
    args = parser.parse_args(argv)
    try:
        manifest = collect(args.folder, args.python_version, args.piece_mb)
    except WheelhouseError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    total = sum(w["bytes"] for w in manifest["wheels"]) / 2**20
    print(f"{args.folder}: {len(manifest['wheels'])} wheels, {total:.0f} MB, manifest.json with their sha256")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
