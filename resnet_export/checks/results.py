"""Per-image verification results, streamed to JSON Lines as batches finish, so a killed run resumes.

Each line is one image: its position and path, its label, the few numbers ``verify.metrics_from`` reduces (both
top-5s, cosine, errors, KL; the exact-kernel run's too), or the reason it could not be read. Lines go to
``OUT.partial``, renamed to ``OUT`` when every image is done; ``resume`` reads the finished batches back (a batch
missing any line is run again) and the figures come out the same as an uninterrupted run's: floats are written
as their shortest repr (exact), and batches are fixed by position (``image_stream.plan``). The first line says
what the results are of; resuming against another artifact, reference or folder is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import DataError

log = logging.getLogger(__name__)

#: The per-row arrays of ``verify.row_stats``, as written.
FLOATS = ("cosine", "max_abs", "sum_abs", "ref_absmax", "kl")
INTEGERS = ("nonfinite", "classes")


@dataclass
class Scored:
    """One batch's rows compared: positions, ``row_stats`` of reference vs candidate (and exact vs candidate),
    labels, the logits of rows among the first ``verify.HEAD_ROWS``, and the unreadable files."""

    start: int
    positions: list[int]
    stats: dict | None
    labels: np.ndarray | None = None
    kernel: dict | None = None
    head: tuple[np.ndarray, np.ndarray] | None = None
    failures: list[tuple[int, str]] = field(default_factory=list)


def _row(stats: dict, i: int) -> dict:
    row = {k: float(stats[k][i]) for k in FLOATS}
    row.update({k: int(stats[k][i]) for k in INTEGERS})
    row.update(top_ref=stats["top_ref"][i].tolist(), top_cand=stats["top_cand"][i].tolist())
    return row


def _stats(rows: list[dict]) -> dict:
    stats = {k: np.array([r[k] for r in rows], np.float64) for k in FLOATS}
    stats.update({k: np.array([r[k] for r in rows], np.int64) for k in INTEGERS})
    stats.update(top_ref=np.array([r["top_ref"] for r in rows]), top_cand=np.array([r["top_cand"] for r in rows]))
    return stats


def lines(scored: Scored, paths: list) -> str:
    """The JSON lines of one batch, in position order."""
    out = []
    for j, position in enumerate(scored.positions):
        entry = {"i": position, "batch": scored.start, "path": str(paths[position]),
                 "label": None if scored.labels is None else int(scored.labels[j]), **_row(scored.stats, j)}
        if scored.kernel is not None:
            entry["kernel"] = _row(scored.kernel, j)
        if scored.head is not None and j < len(scored.head[0]):
            entry["logits"] = [scored.head[0][j].tolist(), scored.head[1][j].tolist()]
        out.append(entry)
    out += [{"i": position, "batch": scored.start, "path": str(paths[position]), "error": text}
            for position, text in scored.failures]
    out.sort(key=lambda e: e["i"])
    return "".join(json.dumps(e) + "\n" for e in out)


def from_lines(entries: list[dict]) -> Scored:
    """A batch read back from its lines (``lines``)."""
    rows = [e for e in entries if "error" not in e]
    failures = [(e["i"], e["error"]) for e in entries if "error" in e]
    stats = _stats(rows) if rows else None
    labels = np.array([r["label"] for r in rows]) if rows and rows[0]["label"] is not None else None
    kernel = _stats([r["kernel"] for r in rows]) if rows and "kernel" in rows[0] else None
    logits = [r["logits"] for r in rows if "logits" in r]
    head = (np.array([ref for ref, _ in logits]), np.array([cand for _, cand in logits])) if logits else None
    return Scored(entries[0]["batch"], [r["i"] for r in rows], stats, labels, kernel, head, failures)


class ResultsFile:
    """Where the per-image results of one verification go (``OUT.partial`` until done), and what a resumed run
    takes over from an interrupted one."""

    def __init__(self, path: str | Path, header: dict, resume: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.header = {"results": "resnet-export verify", **header}
        if self.partial.exists() and not resume:
            raise DataError(f"{self.partial} is left from an interrupted run: pass `resume` to continue it, or "
                            "delete it")
        self.resume = resume
        self._file = None

    def open(self, blocks: list[tuple[int, tuple[int, ...]]], count: int) -> dict[int, Scored]:
        """Start on ``count`` images in ``blocks`` (``image_stream.plan``): the blocks an interrupted run finished, by
        first position."""
        self.header["blocks"] = [[start, list(sizes)] for start, sizes in blocks[:2]] + [len(blocks)]  # in brief
        return self._read(blocks, count) if self.resume and self.partial.exists() else {}

    def _read(self, blocks: list[tuple[int, tuple[int, ...]]], count: int) -> dict[int, Scored]:
        data = self.partial.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]  # a torn last line is cut off
        entries = [json.loads(line) for line in complete.decode().splitlines() if line]
        if not entries or entries[0] != self.header:
            raise DataError(f"{self.partial} holds results of another verification (artifact, reference, images or "
                            f"batches differ): delete it, or name other results with `results`")
        by_batch: dict[int, list[dict]] = {}
        for entry in entries[1:]:
            by_batch.setdefault(entry["batch"], []).append(entry)
        expected = {start: min(sum(sizes), count - start) for start, sizes in blocks}
        done = {start: from_lines(rows) for start, rows in by_batch.items() if len(rows) == expected.get(start)}
        kept = b"".join(json.dumps(e).encode() + b"\n" for e in entries[:1] + [
            e for start in sorted(done) for e in by_batch[start]])
        self.partial.write_bytes(kept)  # only whole batches stay: the rest runs again
        log.info(f"resuming {self.partial.name}: {sum(len(s.positions) + len(s.failures) for s in done.values())} "
                 f"images done")
        return done

    def write(self, scored: Scored, paths: list) -> None:
        """Append one batch's lines and flush them."""
        if self._file is None:
            new = not self.partial.exists() or self.partial.stat().st_size == 0
            self._file = open(self.partial, "a")
            if new:
                self._file.write(json.dumps(self.header) + "\n")
        self._file.write(lines(scored, paths))
        self._file.flush()

    def finish(self) -> None:
        """Close the lines and name them ``OUT``: every image is done."""
        if self._file is None:
            self.write(Scored(0, [], None), [])
        self._file.close()
        os.replace(self.partial, self.path)
