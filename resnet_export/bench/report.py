"""The benchmark's reports: report.json, report.md and two charts, from the rows ``bench`` measured."""

from __future__ import annotations

import datetime
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .rows import SCHEMA_VERSION, Row, fastest_groups


def write_reports(rows: list[Row], env: dict, model: str, folder: Path, comparison=None,
                  weights: str | None = None) -> dict[str, Path]:
    """report.json, report.md, throughput.png and latency.png under ``folder`` (written atomically).

    ``comparison`` (a ``baseline.Comparison``) is recorded in report.json and appended to report.md.
    """
    from ..manifest import atomic_output, write_json

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("report.json", "report.md", "throughput.png", "latency.png")}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(paths["report.json"], {"schema_version": SCHEMA_VERSION, "model": model, "weights": weights,
                                      "created": created,
                                      "environment": env,
                                      "rows": [asdict(r) for r in rows],
                                      "compared_with": comparison.to_dict() if comparison else None})
    with atomic_output(paths["report.md"]) as tmp:
        tmp.write_text(markdown_report(rows, env, model, weights) + (f"\n{comparison.markdown()}" if comparison else ""))
    caption = "\n".join(what_was_measured(env, weights))
    for name, draw in (("throughput.png", _throughput_chart), ("latency.png", _latency_chart)):
        with atomic_output(paths[name]) as tmp:
            draw(rows, model, tmp, caption)
    return paths


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else ""


#: The table's columns: header, alignment, and the cell of an ok row.
COLUMNS = [
    ("backend", "---", lambda r: r.backend), ("precision", "---", lambda r: r.precision),
    ("batch", "---:", lambda r: str(r.batch)), ("timing", "---", lambda r: r.timing),
    ("device", "---", lambda r: r.device),
    ("threads set", "---", lambda r: "" if r.threads_setting is None else str(r.threads_setting)),
    ("cores busy", "---:", lambda r: f"{r.cores_busy:.2f}"),
    *((f"{p} ms", "---:", lambda r, p=p: f"{r.latency_ms[p]:.2f}") for p in ("p50", "p90", "p99", "mean")),
    ("img/s", "---:", lambda r: f"**{r.throughput:.1f}** (fastest)" if r.fastest else f"{r.throughput:.1f}"),
    ("vs torch fp32 (same device)", "---:", lambda r: _ratio(r.speedup_vs_torch)),
    ("vs best torch", "---:", lambda r: _ratio(r.speedup_vs_best_torch)),
    ("top-1 agree", "---:", lambda r: "" if r.top1_agreement is None else f"{r.top1_agreement:.1%}"),
    ("max abs err", "---:", lambda r: "" if r.max_abs_err is None else f"{r.max_abs_err:.3g}"),
    ("gate", "---", lambda r: r.gate or ""),
    ("compile s", "---:", lambda r: "" if r.compile_seconds is None else f"{r.compile_seconds:.1f}"),
]


def _columns(rows: list[Row]) -> list[tuple]:
    """The columns some ok row fills; "vs best torch" only where it says more than "vs torch fp32" somewhere."""
    ok = [r for r in rows if r.status == "ok"]
    kept = [c for c in COLUMNS if c[0] in ("backend", "precision", "batch") or any(c[2](r) for r in ok)]
    if all(r.speedup_vs_best_torch in (None, r.speedup_vs_torch) for r in ok):
        kept = [c for c in kept if c[0] != "vs best torch"]
    return kept


def what_was_measured(env: dict, weights: str | None) -> list[str]:
    """The lines that say what a report measured: machine, versions, weights, calibration and INT8 forms."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [f"CPU: {env['cpu']} ({env['cores']} cores; {' '.join(env['cpu_flags']) or 'no AVX2'}), threads requested: "
             f"{env['threads_requested'] or 'library defaults'}, GPU: {env['gpu'] or 'none'}"
             + (", TF32 allowed in ONNX Runtime's and TensorRT's FP32 rows" if env.get("tf32_allowed") else ""),
             f"Versions: {versions}"]
    if weights:
        lines.append(f"Weights: {weights}" + (" (top-1 agreement compares near-tie logits: each row is gated on "
                                              "fidelity instead)" if weights == "random" else ""))
    if env.get("int8"):
        lines.append(f"INT8: {env['int8']}")
    return lines


def markdown_report(rows: list[Row], env: dict, model: str, weights: str | None = None) -> str:
    """A table a person can read: latency, throughput, speed-ups within each device, agreement and gate (columns no
    row fills are left out); then the baselines each device's speed-ups divide by, notes, and the fastest row per
    precision, batch and clock."""
    columns = _columns(rows)
    lines = [f"# Benchmark: {model}", "", *what_was_measured(env, weights), "",
             "| " + " | ".join(c[0] for c in columns) + " |", "|" + "|".join(c[1] for c in columns) + "|"]
    notes = []
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.backend} | {r.precision} | {r.batch} | {r.status}: {r.reason} |"
                         + " |" * (len(columns) - 4))
            continue
        if r.note and r.note not in notes:
            notes.append(r.note)
        lines.append("| " + " | ".join(c[2](r) for c in columns) + " |")
    lines += ["", "Speed-ups divide by PyTorch FP32 of the same batch on the same device, in this run:"]
    for name in sorted({r.device for r in rows if r.status == "ok"}):
        base = next((r for r in rows if r.device == name and r.baseline and r.backend == "torch"
                     and r.precision == "fp32" and r.streams == 1), None)
        lines.append(f"- {name}: " + (f"by torch fp32 ({base.timing})" if base
                                       else "no PyTorch FP32 row on this device in this run: no speed-up"))
    if any(c[0] == "vs best torch" for c in columns):
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


def _caption(fig, caption: str) -> None:
    """The machine, versions and weights under a chart, so a PNG read alone still says what it measured."""
    import textwrap

    text = "\n".join(textwrap.fill(line, 150) for line in caption.splitlines())
    fig.text(0.01, 0.005, text, fontsize=6, va="bottom", ha="left", color="0.3")
    fig.tight_layout(rect=(0, 0.04 + 0.022 * text.count("\n"), 1, 1))


def _throughput_chart(rows: list[Row], model: str, path: Path, caption: str = "") -> None:
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
    _caption(fig, caption)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _latency_chart(rows: list[Row], model: str, path: Path, caption: str = "") -> None:
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
    if ok:
        ax.legend()
    _caption(fig, caption)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
