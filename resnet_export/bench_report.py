"""The benchmark's reports: report.json, report.md and two charts, from the rows ``bench`` measured."""

from __future__ import annotations

import datetime
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .bench import SCHEMA_VERSION, Row, fastest_groups


def write_reports(rows: list[Row], env: dict, model: str, folder: Path, comparison=None,
                  weights: str | None = None) -> dict[str, Path]:
    """report.json, report.md, throughput.png and latency.png under ``folder`` (written atomically).

    ``comparison`` (a ``baseline.Comparison``) is recorded in report.json and appended to report.md.
    """
    from .manifest import atomic_output, write_json

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("report.json", "report.md", "throughput.png", "latency.png")}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(paths["report.json"], {"schema_version": SCHEMA_VERSION, "model": model, "weights": weights,
                                      "created": created,
                                      "environment": env,
                                      "rows": [asdict(r) for r in rows],
                                      "compared_with": comparison.to_dict() if comparison else None})
    with atomic_output(paths["report.md"]) as tmp:
        tmp.write_text(markdown_report(rows, env, model) + (f"\n{comparison.markdown()}" if comparison else ""))
    for name, draw in (("throughput.png", _throughput_chart), ("latency.png", _latency_chart)):
        with atomic_output(paths[name]) as tmp:
            draw(rows, model, tmp)
    return paths


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else ""


def markdown_report(rows: list[Row], env: dict, model: str) -> str:
    """A table a person can read: latency, throughput, speed-ups within each device, agreement; then the
    baselines each device's speed-ups divide by, notes, and the fastest row per precision, batch and clock."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"# Benchmark: {model}",
        "",
        f"CPU: {env['cpu']} ({env['cores']} cores; {' '.join(env['cpu_flags']) or 'no AVX2'}), threads requested: {env['threads_requested'] or 'library defaults'}, "
        f"GPU: {env['gpu'] or 'none'}" + (", TF32 allowed in FP32 rows" if env.get("tf32_allowed") else ""),
        f"Versions: {versions}",
        "",
        "| backend | precision | batch | timing | device | threads set | cores busy | p50 ms | p90 ms | p99 ms | mean ms | img/s "
        "| vs torch fp32 (same device) | vs best torch | top-1 agree | max abs err | compile s |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.backend} | {r.precision} | {r.batch} | {r.status}: {r.reason} |" + " |" * 13)
            continue
        lat = r.latency_ms
        throughput = f"**{r.throughput:.1f}** (fastest)" if r.fastest else f"{r.throughput:.1f}"
        agreement = "" if r.top1_agreement is None else f"{r.top1_agreement:.1%}"
        error = "" if r.max_abs_err is None else f"{r.max_abs_err:.3g}"
        compiled = "" if r.compile_seconds is None else f"{r.compile_seconds:.1f}"
        if r.note and r.note not in notes:
            notes.append(r.note)
        lines.append(
            f"| {r.backend} | {r.precision} | {r.batch} | {r.timing} | {r.device} | "
            f"{r.threads_setting if r.threads_setting is not None else ''} | {r.cores_busy:.2f} | "
            f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['mean']:.2f} | {throughput} | "
            f"{_ratio(r.speedup_vs_torch)} | {_ratio(r.speedup_vs_best_torch)} | {agreement} | {error} | {compiled} |"
        )
    lines += ["", "Speed-ups divide by PyTorch FP32 of the same batch on the same device, in this run:"]
    for name in sorted({r.device for r in rows if r.status == "ok"}):
        base = next((r for r in rows if r.device == name and r.baseline and r.backend == "torch"
                     and r.precision == "fp32" and r.streams == 1), None)
        lines.append(f"- {name}: " + (f"by torch fp32 ({base.timing})" if base
                                       else "no PyTorch FP32 row on this device in this run: no speed-up"))
    if any(r.speedup_vs_best_torch for r in rows):
        lines.append("- vs best torch: by the fastest PyTorch row (eager or torch.compile, any precision) of the "
                     "same device and batch")
    if any(r.compile_seconds is not None for r in rows):
        lines.append("- compile s: torch.compile's first call of that batch shape (compile and one run), not in the timings")
    if notes:
        lines += ["", "Notes:", *(f"- {note}" for note in notes)]
    summary = fastest_summary(rows)
    if summary:
        lines += ["", "Fastest backend per precision, batch size and clock (only rows measured by the same clock "
                  "compare; the margin is over the next one):", *summary]
    return "\n".join(lines) + "\n"


def fastest_summary(rows: list[Row]) -> list[str]:
    """One line per precision, batch and clock: the fastest row and its margin over the next one, from the same run."""
    lines = []
    for (precision, batch, clock), group in fastest_groups(rows).items():
        best = next((r for r in group if r.fastest), None)
        if best is None:
            continue
        others = sorted((r for r in group if r is not best), key=lambda r: -(r.throughput or 0.0))
        backends = [r.backend for r in group]

        def name(row: Row) -> str:  # what sets it apart where a backend has several rows of this clock
            if backends.count(row.backend) == 1:
                return row.backend
            return f"{row.backend} ({(row.timing or '').split('inputs on device, ')[-1]})"

        margin = f"{best.throughput / others[0].throughput:.2f}x {name(others[0])}" if others else "the only row"
        lines.append(f"- {precision} batch {batch}, {clock}: **{name(best)}** ({best.throughput:.1f} img/s; {margin})")
    return lines


def _series(rows: list[Row]) -> dict[str, list[Row]]:
    series: dict[str, list[Row]] = {}
    for r in rows:
        if r.status == "ok":
            series.setdefault(f"{r.backend} {r.precision} on {r.device} ({r.timing})", []).append(r)
    return series


def _throughput_chart(rows: list[Row], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in _series(rows).items():
        ax.plot([r.batch for r in points], [r.throughput for r in points], marker="o", label=label)
    ax.set(xlabel="batch size", ylabel="images / s", title=f"{model}: throughput")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(sorted({r.batch for r in rows}), labels=[str(b) for b in sorted({r.batch for r in rows})])
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a report written before any row ran (gpu_check) has none
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _latency_chart(rows: list[Row], model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(ok)), 5))
    x = np.arange(len(ok))
    for offset, key in zip((-0.25, 0, 0.25), ("p50", "p90", "p99")):
        ax.bar(x + offset, [r.latency_ms[key] for r in ok], width=0.25, label=key)
    ax.set_xticks(x, labels=[f"{r.backend}\n{r.precision} b{r.batch}" for r in ok], fontsize=7)
    ax.set(ylabel="latency (ms)", title=f"{model}: latency percentiles", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
