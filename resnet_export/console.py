"""Progress and messages on stderr (stdout stays free for results such as ``list`` tables)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from rich.console import Console

console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    """Show ``text`` with a spinner while the block runs, then a done line with the elapsed time."""
    start = time.perf_counter()
    with console.status(text + " ..."):
        yield
    console.print(f"{text} done ({time.perf_counter() - start:.1f} s)", soft_wrap=True)


def warn(text: str) -> None:
    """One ``Warning: ...`` line."""
    console.print(f"[yellow]Warning:[/yellow] {text}", soft_wrap=True)
