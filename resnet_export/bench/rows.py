"""A benchmark row, the report schema it is written in, and how rows are grouped to compare (the harness and the
reports both read these)."""

from __future__ import annotations

from dataclasses import dataclass, field

#: 2: rows name their thread setting (threads_setting) and measure cores_busy; 3: fastest; 4: each row's device,
#: clock and baseline (speed-ups within a device), vs the best PyTorch row, compile time, streams, TF32.
SCHEMA_VERSION = 4


#: The clock of rows timed around a whole call, host memory to host memory.
WALL_CLOCK = "wall clock"


@dataclass
class Row:
    """One backend x precision x batch measurement (or the reason there is none)."""

    backend: str
    precision: str
    batch: int
    status: str = "ok"  # ok | skipped | error
    reason: str | None = None
    timing: str | None = None  # what the clock covers
    iterations: int = 0
    latency_ms: dict = field(default_factory=dict)  # p50, p90, p99, mean
    throughput: float | None = None  # images/s
    #: img/s over PyTorch FP32's on the same device and batch, in this run (``baseline`` names that row)
    speedup_vs_torch: float | None = None
    top1_agreement: float | None = None
    max_abs_err: float | None = None
    #: the runner's thread setting as its library reports its configuration (a setting, not a measurement)
    threads_setting: int | str | None = None
    #: measured: the process's CPU seconds over wall seconds across the warm-up and timed runs (all threads)
    cores_busy: float | None = None
    #: the highest img/s of the rows of its precision, batch size and clock, in this run
    fastest: bool = False
    device: str = "cpu"  # "cpu" or the GPU's name
    clock: str = WALL_CLOCK  # what measured it: the wall clock, CUDA events, ...
    baseline: str | None = None  # the row speedup_vs_torch divides by
    #: img/s over the fastest PyTorch row (eager or compiled, any precision) of the same device and batch
    speedup_vs_best_torch: float | None = None
    best_torch: str | None = None
    compile_seconds: float | None = None  # torch.compile: the first call of this batch shape, not timed
    streams: int = 1  # runners timed at once, each on its own stream and thread
    tf32: bool | None = None  # FP32 rows on the GPU: whether TF32 was allowed
    note: str | None = None  # what a reader must know of an ok row
    #: its outputs against PyTorch FP32 under the gate of its precision and weights (``checks.verify.plan_gate``):
    #: "passed", the thresholds missed, or None where not gated
    gate: str | None = None


def fastest_groups(rows: list[Row]) -> dict[tuple[str, int, str], list[Row]]:
    """The timed rows grouped by precision, batch and clock: only rows measured by the same clock compare."""
    groups: dict[tuple[str, int, str], list[Row]] = {}
    for row in rows:
        if row.status == "ok" and row.throughput:
            groups.setdefault((row.precision, row.batch, row.clock), []).append(row)
    return groups
