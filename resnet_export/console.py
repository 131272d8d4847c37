"""The command line's terminal: rich progress for the library's tasks, its log lines on stderr.

stdout stays free for results (``list`` tables, summary lines). Messages name the library's
parameters in backticks; here they become the command line's flags.
"""

from __future__ import annotations

import logging
import re

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn

console = Console(stderr=True, highlight=False)

#: Library parameter -> the flag that sets it, where the two names differ beyond ``_`` -> ``-``.
FLAGS = {"factory": "--model", "calib": "--calib DIR", "images": "--images DIR", "cpu_form": "--cpu"}


def as_flags(text: str) -> str:
    """Replace the backticked parameter names of a library message with command-line flags."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m[1], "--" + m[1].replace("_", "-")), text)


class RichListener:
    """Draws the library's tasks: a spinner for open-ended ones, a bar for counted ones (nested ok)."""

    def __init__(self):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TaskProgressColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.tasks: list[int] = []

    def start(self, description: str, total: int | None) -> None:
        if not self.tasks:
            self.progress.start()
        self.tasks.append(self.progress.add_task(description + " ...", total=total))

    def advance(self, steps: int = 1) -> None:
        if self.tasks:
            self.progress.advance(self.tasks[-1], steps)

    def end(self) -> None:
        self.progress.remove_task(self.tasks.pop())
        if not self.tasks:
            self.progress.stop()


class RichLogHandler(logging.Handler):
    """The library's log records as lines on stderr: ``Warning: ...`` for warnings, plain for info."""

    def emit(self, record: logging.LogRecord) -> None:
        text = as_flags(record.getMessage())
        if record.levelno >= logging.WARNING:
            console.print(f"[yellow]Warning:[/yellow] {escape(text)}", soft_wrap=True)
        else:
            console.print(text, soft_wrap=True, markup=False)
