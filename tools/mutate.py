"""`make mutate`: each named break of a product rule (tools/mutations.py) against the tests that guard it.

A plain list of named patches rather than mutmut or cosmic-ray: each break here is a rule a user relies on, broken
the way a real change would break it, and run against the few tests that should see it (a generated mutant of every
operator would take hours on two cores and say little about the rules). The package, tests and benchmarks are copied
to a temporary folder once; each break is applied there alone, its tests run with that copy first on the path, and
the copy restored. The working tree is never touched. Exit 1 when a break survives or no longer applies.

    make mutate                      # every break
    make mutate ONLY="served"        # the breaks whose name holds this text
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from mutations import MUTATIONS  # noqa: E402

COPIED = ("resnet_export", "tests", "benchmarks", "pyproject.toml")


def run_one(copy: Path, mutation: dict) -> tuple[str, float]:
    """Apply ``mutation`` in ``copy``, run its tests, restore; ``killed``, ``SURVIVED`` or ``STALE`` and seconds."""
    target = copy / mutation["file"]
    original = target.read_text()
    if original.count(mutation["old"]) != 1:
        return "STALE", 0.0  # the code changed: the break must be rewritten to the new code
    target.write_text(original.replace(mutation["old"], mutation["new"]))
    start = time.perf_counter()
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))}
        child = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                *mutation["tests"]], cwd=copy, env=env, capture_output=True, text=True)
    finally:
        target.write_text(original)
    if child.returncode == 5:
        return "STALE", time.perf_counter() - start  # no test collected: a guarding test was renamed
    return ("killed" if child.returncode != 0 else "SURVIVED"), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the breaks whose name holds this text")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m["name"]]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as folder:
        copy = Path(folder)
        for name in COPIED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
            else:
                shutil.copyfile(source, copy / name)
        for index, mutation in enumerate(chosen, 1):
            outcome, seconds = run_one(copy, mutation)
            outcomes.append((mutation, outcome))
            print(f"[{index}/{len(chosen)}] {outcome:8s} {seconds:6.1f} s  {mutation['name']} ({mutation['rule']})",
                  flush=True)
    bad = [(m, o) for m, o in outcomes if o != "killed"]
    print(f"\n{len(outcomes) - len(bad)} of {len(outcomes)} breaks killed"
          + "".join(f"\n{o}: {m['name']} in {m['file']} (tests: {', '.join(m['tests'])})" for m, o in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
