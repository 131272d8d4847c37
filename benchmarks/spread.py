"""Run-to-run spread of a benchmark command on this machine: what `bench --baseline`'s tolerance must exceed.

Runs the command ``2 * PAIRS`` times back to back (``--report OUT/run-NN``, artifacts built once and shared),
then compares each pair (run 2k+1 against run 2k as its baseline, as ``bench --baseline`` would a minute
apart) row by row: the change of speed-up over PyTorch eager and of img/s. Writes ``OUT/spread.md`` and
``OUT/spread.json`` and prints the Markdown. ``make bench-spread`` runs it on the CI benchmark's command.

    .venv/bin/python benchmarks/spread.py OUT PAIRS -- COMMAND...
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnet_export.bench.baseline import cpu_class, row_key  # noqa: E402

MEASURES = (("speed-up vs torch", "speedup_vs_torch"), ("img/s", "throughput"))


def run_all(out: Path, pairs: int, command: list[str]) -> list[dict]:
    """The command's reports of ``2 * pairs`` runs, artifacts shared through one folder."""
    shared = out / "artifacts"
    shared.mkdir(parents=True, exist_ok=True)
    reports = []
    for i in range(2 * pairs):
        folder = out / f"run-{i:02d}"
        folder.mkdir(exist_ok=True)
        if not (folder / "artifacts").exists():
            (folder / "artifacts").symlink_to(shared.resolve())
        start = time.perf_counter()
        subprocess.run([*command, "--report", str(folder)], check=True, stdout=subprocess.DEVNULL)
        print(f"run {i + 1}/{2 * pairs} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        reports.append(json.loads((folder / "report.json").read_text()))
    return reports


def pair_changes(reports: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per row and measure, the percent change of each pair's second run against its first."""
    changes: dict[str, dict[str, list[float]]] = {}
    for first, second in zip(reports[::2], reports[1::2]):
        before = {row_key(r): r for r in first["rows"] if r["status"] == "ok"}
        for row in second["rows"]:
            old = before.get(row_key(row))
            if row["status"] != "ok" or old is None:
                continue
            for measure, name in MEASURES:
                if name == "speedup_vs_torch" and (row["backend"], row["precision"]) == ("torch", "fp32"):
                    continue  # 1.00x by definition
                changes.setdefault(row_key(row), {}).setdefault(measure, []).append(
                    100 * (row[name] / old[name] - 1))
    return changes


def markdown(changes: dict, command: list[str], env: dict, pairs: int) -> str:
    """The spread table: per row and measure, median and largest absolute change and the largest drop."""
    lines = [f"Spread of `{' '.join(command)}` over {pairs} pairs of back-to-back runs on "
             f"{env['cpu']} ({env['cores']} cores; {' '.join(env['cpu_flags'])}; class {cpu_class(env)}), {time.strftime('%Y-%m-%d')}:", "",
             "| row | measure | median abs change | largest abs change | largest drop |", "|---|---|---:|---:|---:|"]
    for key, measures in sorted(changes.items()):
        for measure, values in measures.items():
            a = np.abs(values)
            lines.append(f"| {key} | {measure} | {np.median(a):.1f}% | {a.max():.1f}% | {min(0.0, min(values)):.1f}% |")
    for measure, _ in MEASURES:
        every = [v for m in changes.values() for v in m.get(measure, [])]
        if every:
            lines.append(f"\nAll rows, {measure}: median abs change {np.median(np.abs(every)):.1f}%, "
                         f"95th percentile {np.percentile(np.abs(every), 95):.1f}%, largest drop {min(every):.1f}%.")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    out, pairs, command = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[4:]
    reports = run_all(out, pairs, command)
    changes = pair_changes(reports)
    env = reports[0]["environment"]
    text = markdown(changes, command, env, pairs)
    (out / "spread.md").write_text(text)
    (out / "spread.json").write_text(json.dumps({"command": command, "pairs": pairs, "environment": env,
                                                 "changes_pct": changes}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
