"""A benchmark run against a baseline report: which rows regressed, which improved, on measures that travel.

Absolute times mean nothing across machines, so each row is compared on what survives a change of
machine within one CPU class (architecture, best INT8 instruction set, core count): its speed-up over
PyTorch eager in the same run, its top-1 agreement and its max error. Throughput itself is compared
only when the environment matches (CPU model, flags, cores, requested threads) and the CPU's name
identifies its model: a hypervisor's generic name says nothing of the host's speed. A baseline from another
CPU class is compared on fidelity alone, with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ResnetExportError
from ..cpu import INT8_ISA_ORDER

log = logging.getLogger(__name__)

#: A row's top-1 agreement may fall this much (absolute) before it counts as a regression, and always by one
#: input's flip (a row of B inputs: 1/B), which is no trend.
AGREEMENT_SLACK = 0.01
#: A row's speed (speed-up over PyTorch eager; img/s in the same environment) may fall this many percent before it
#: counts as a regression: above the run-to-run spread measured on a 2-core CI machine (largest drop 28.7% over
#: 10 pairs of `make bench-ci`, 1-second rows in 5 rounds; benchmarks/README.md), so noise never fails a run.
DEFAULT_MAX_REGRESSION = 40.0


class BaselineError(ResnetExportError):
    """A baseline report cannot be used."""


def cpu_class(environment: dict) -> str:
    """The CPU class of a report's environment, e.g. ``x86_64-amx_int8-2c``: best INT8 ISA and cores."""
    flags = set(environment.get("cpu_flags") or [])
    isa = next((f for f in INT8_ISA_ORDER if f in flags), "no-avx2")
    return f"{environment.get('arch', 'x86_64')}-{isa}-{environment.get('cores')}c"


def identifies_cpu(name: str | None) -> bool:
    """Whether a CPU model name names the part (``AMD EPYC 7B13``), not a hypervisor's generic CPU model
    (``Intel(R) Xeon(R) Processor``, ``Common KVM processor``, ``QEMU Virtual CPU``), behind which hosts of
    any speed hide: two runs on an AMX "Intel(R) Xeon(R) Processor" measured torch FP32 at 51.7 and 19.4 img/s."""
    if not name or name.startswith(("QEMU Virtual CPU", "Common KVM processor")):
        return False
    return any(ch.isdigit() for ch in name)


def _same_environment(a: dict, b: dict) -> bool:
    keys = ("cpu", "cpu_flags", "cores", "threads_requested")
    return identifies_cpu(a.get("cpu")) and all(a.get(k) == b.get(k) for k in keys)


@dataclass
class Change:
    """One measure of one row that moved beyond the tolerance."""

    row: str
    measure: str
    baseline: float
    now: float

    @property
    def change(self) -> str:
        if self.measure in ("top-1 agreement",):
            return f"{100 * (self.now - self.baseline):+.1f} points"
        return f"{100 * (self.now / self.baseline - 1):+.0f}%" if self.baseline else "new"


@dataclass
class Comparison:
    """What a run was compared with and what moved."""

    baseline: str
    baseline_class: str
    this_class: str
    same_class: bool
    same_environment: bool
    max_regression_pct: float
    measures: list[str]
    regressions: list[Change] = field(default_factory=list)
    improvements: list[Change] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        """The comparison as Markdown: what was compared with, then regressions and improvements tables."""
        lines = [f"## Compared with {self.baseline}", "",
                 f"Baseline CPU class {self.baseline_class}, this run {self.this_class}; measures: "
                 f"{', '.join(self.measures)}; tolerance {self.max_regression_pct:g}%."]
        if not self.same_class:
            lines.append("Another CPU class: speed is not compared, fidelity only.")
        for title, changes in (("Regressions", self.regressions), ("Improvements", self.improvements)):
            lines += ["", f"### {title}: {len(changes)}"]
            if changes:
                lines += ["", "| row | measure | baseline | now | change |", "|---|---|---:|---:|---:|"]
                lines += [f"| {c.row} | {c.measure} | {c.baseline:.4g} | {c.now:.4g} | {c.change} |" for c in changes]
        if self.not_compared:
            lines += ["", "Not in both runs: " + ", ".join(self.not_compared)]
        return "\n".join(lines) + "\n"


def row_key(row: dict) -> str:
    """A row's name across runs: backend, precision, batch and what the clock covers."""
    return f"{row['backend']} {row['precision']} b{row['batch']}" + (f" ({row['timing']})" if row.get("timing") else "")


def load_report(path: Path) -> dict:
    """A benchmark report.json, or a one-line error."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BaselineError(f"baseline {path} cannot be read as a report.json ({exc})") from exc
    if not isinstance(report, dict) or "rows" not in report or "environment" not in report:
        raise BaselineError(f"baseline {path} is not a `resnet-export bench` report.json")
    return report


def find_baseline(path: Path, model: str, environment: dict) -> Path | None:
    """``path`` itself, or in a folder the report of ``model`` whose CPU class is this machine's (None if none)."""
    path = Path(path)
    if not path.is_dir():
        return path
    wanted = cpu_class(environment)
    for candidate in sorted(path.glob("*.json")):
        try:
            report = json.loads(candidate.read_text())
        except ValueError:
            continue
        if report.get("model") == model and cpu_class(report.get("environment", {})) == wanted:
            return candidate
    return None


def compare_reports(report: dict, baseline: dict, baseline_name: str, max_regression_pct: float = DEFAULT_MAX_REGRESSION) -> Comparison:
    """Compare ``report``'s rows with ``baseline``'s: regressions beyond ``max_regression_pct`` percent
    (speed) or ``AGREEMENT_SLACK`` and one input's flip (agreement, between runs of trained weights only),
    and improvements beyond the same tolerance."""
    if report.get("model") != baseline.get("model"):
        raise BaselineError(f"baseline {baseline_name} is of {baseline.get('model')}, this run of {report.get('model')}")
    env, base_env = report["environment"], baseline["environment"]
    same_class = cpu_class(env) == cpu_class(base_env)
    same_env = _same_environment(env, base_env)
    if not same_class:
        log.warning(f"baseline {baseline_name} is from CPU class {cpu_class(base_env)}, this machine is "
                    f"{cpu_class(env)}: comparing fidelity only")
    elif not identifies_cpu(env.get("cpu")):
        log.warning(f"this CPU's name ({env.get('cpu')}) does not identify its model (a hypervisor's generic "
                    "name): img/s is not compared, speed-ups within the run are")
    # Agreement is gated only between runs of trained weights: random logits are near-ties, where one flip
    # is a 12.5-100 point "regression" of a 1- or 8-input row; max error still guards those.
    trained = report.get("weights") == baseline.get("weights") == "trained"
    measures = (["speed-up vs torch"] if same_class else []) + (["img/s"] if same_env else []) + \
        (["top-1 agreement"] if trained else []) + ["max abs err"]
    comparison = Comparison(baseline_name, cpu_class(base_env), cpu_class(env), same_class, same_env,
                            max_regression_pct, measures)
    tolerance = max_regression_pct / 100
    before = {row_key(r): r for r in baseline["rows"] if r["status"] == "ok"}
    now = {row_key(r): r for r in report["rows"] if r["status"] == "ok"}
    comparison.not_compared = sorted(set(before) ^ set(now))
    for key in sorted(set(before) & set(now)):
        old, new = before[key], now[key]
        speeds = [("speed-up vs torch", "speedup_vs_torch")] if same_class else []
        speeds += [("img/s", "throughput")] if same_env else []
        for measure, field_name in speeds:
            if field_name == "speedup_vs_torch" and (new["backend"], new["precision"]) == ("torch", "fp32"):
                continue  # the reference row: 1.00x by definition
            a, b = old.get(field_name), new.get(field_name)
            if not (a and b):
                continue
            if b < a * (1 - tolerance):
                comparison.regressions.append(Change(key, measure, a, b))
            elif b > a * (1 + tolerance):
                comparison.improvements.append(Change(key, measure, a, b))
        a, b = old.get("top1_agreement"), new.get("top1_agreement")
        if trained and a is not None and b is not None:
            slack = max(AGREEMENT_SLACK, 1.5 / new["batch"])  # more than one input must flip
            if b < a - slack:
                comparison.regressions.append(Change(key, "top-1 agreement", a, b))
            elif b > a + slack:
                comparison.improvements.append(Change(key, "top-1 agreement", a, b))
        a, b = old.get("max_abs_err"), new.get("max_abs_err")
        if a is not None and b is not None and b > 2 * a + 1e-4:  # errors are tiny and jumpy: a doubling counts
            comparison.regressions.append(Change(key, "max abs err", a, b))
    return comparison


def trend(folder: Path, output: Path) -> dict[str, Path]:
    """The reports under ``folder`` (``**/report.json``, oldest first) as one Markdown table and one PNG of
    speed-up over PyTorch eager and top-1 agreement per row, so a slow drift shows. Returns the paths."""
    from ..manifest import atomic_output

    found = sorted(Path(folder).rglob("report.json"))
    if not found:
        raise BaselineError(f"no report.json under {folder}")
    reports = [(p, load_report(p)) for p in found]
    reports.sort(key=lambda item: item[1].get("created") or "")
    keys = sorted({row_key(r) for _, report in reports for r in report["rows"] if r["status"] == "ok"})
    series = {key: [(next((r for r in report["rows"] if row_key(r) == key and r["status"] == "ok"), None))
                    for _, report in reports] for key in keys}
    labels = [report.get("created") or str(path.parent.name) for path, report in reports]
    lines = [f"# Benchmark trend: {len(reports)} reports under {folder}", "",
             "| row | measure | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for key in keys:
        for measure, field_name, fmt in (("speed-up vs torch", "speedup_vs_torch", "{:.2f}x"),
                                         ("top-1 agreement", "top1_agreement", "{:.1%}")):
            cells = [fmt.format(r[field_name]) if r and r.get(field_name) is not None else "" for r in series[key]]
            lines.append(f"| {key} | {measure} | " + " | ".join(cells) + " |")
    output.mkdir(parents=True, exist_ok=True)
    paths = {"trend.md": output / "trend.md", "trend.png": output / "trend.png"}
    with atomic_output(paths["trend.md"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_output(paths["trend.png"]) as tmp:
        _trend_chart(series, len(reports), tmp)
    return paths


def _trend_chart(series: dict[str, list], count: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, agreement) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for key, rows in series.items():
        runs = [i for i, r in enumerate(rows) if r]
        speed.plot(runs, [rows[i].get("speedup_vs_torch") or float("nan") for i in runs], marker="o", label=key)
        agreement.plot(runs, [rows[i].get("top1_agreement") for i in runs], marker="o", label=key)
    speed.set(ylabel="speed-up vs PyTorch eager", title="Benchmark trend")
    agreement.set(ylabel="top-1 agreement", xlabel="report (oldest first)")
    agreement.set_xticks(range(count))
    for ax in (speed, agreement):
        ax.grid(alpha=0.3)
    speed.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
