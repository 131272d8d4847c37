"""Sidecar manifests, hashing and atomic writes.

Every artifact ``X`` gets ``X.json`` beside it. Artifacts and manifests are written to a temporary
file in the destination directory and renamed into place, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

from .errors import OutputError

MANIFEST_SCHEMA = 1


def check_writable_dir(path: Path) -> None:
    """Raise OutputError unless the directory that will hold ``path`` exists and is writable."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    try:  # os.access says yes to root even where writing fails, so try it
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise OutputError(f"output directory {parent} is not writable ({exc.strerror})") from exc


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or the same inode (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(outputs: list[str | os.PathLike], inputs: list[str | os.PathLike | None]) -> None:
    """Raise OutputError when an output (or its manifest) would overwrite one of the inputs.

    No command writes over its own input: a same-path or hard-linked request is refused before any work.
    """
    written = [Path(o) for o in outputs] + [manifest_path(o) for o in outputs]
    for given in inputs:
        if given is None or not Path(given).is_file():
            continue
        for output in written:
            if _same_file(output, Path(given)):
                raise OutputError(f"{output} would overwrite the input {given}: choose another output path")


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.NAME.<pid>.*.tmp`` files that processes no longer alive left beside ``path``."""
    for stale in path.resolve().parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary file carries this process's id, so a later write of ``path`` removes what a killed
    process left (an interrupted one removes its own).
    """
    path = Path(path)
    check_writable_dir(path)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(artifact: str | os.PathLike) -> Path:
    """The sidecar manifest path of an artifact: ``X`` -> ``X.json``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def library_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of the given distributions (None when absent), plus Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(artifact: str | os.PathLike, stage: str, **sections) -> Path:
    """Write ``artifact``'s sidecar manifest with its hash, the stage that made it and ``sections``."""
    from ._version import __version__

    data = {
        "schema": MANIFEST_SCHEMA,
        "artifact": Path(artifact).name,
        "sha256": sha256_file(artifact),
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "toolkit_version": __version__,
        **sections,
        "versions": library_versions("torch", "torchvision", "onnx", "onnxruntime-gpu", "onnxscript"),
    }
    path = manifest_path(artifact)
    write_json(path, data)
    return path
