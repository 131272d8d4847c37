"""How the library reports long work: ``logging`` for messages, an optional listener for progress.

The library never prints. Each module logs to its own logger (``resnet_export.<module>``): INFO for
finished steps, WARNING for what the user should know. A listener installed with ``set_listener``
(the command line's draws rich spinners and bars) is told when a task starts, advances and ends.
Messages name the Python parameters in backticks (```calib_size```); the command line shows them
as its flags (``--calib-size``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator, Protocol


class Listener(Protocol):
    """Receives the progress of tasks; tasks may nest."""

    def start(self, description: str, total: int | None) -> None: ...

    def advance(self, steps: int = 1) -> None: ...

    def end(self) -> None: ...


_listener: Listener | None = None


def set_listener(listener: Listener | None) -> Listener | None:
    """Install ``listener`` (None: none) and return the one it replaces."""
    global _listener
    previous, _listener = _listener, listener
    return previous


@contextlib.contextmanager
def task(logger: logging.Logger, description: str, total: int | None = None,
         done: bool = True) -> Iterator[Callable[[int], None]]:
    """Report ``description`` while the block runs (``total`` steps, or unknown); yields ``advance(n=1)``.

    With ``done``, a block that finishes logs ``description done (S s)`` at INFO.
    """
    listener = _listener
    start = time.perf_counter()
    if listener:
        listener.start(description, total)
    try:
        yield listener.advance if listener else (lambda steps=1: None)
    finally:
        if listener:
            listener.end()
    if done:
        logger.info("%s done (%.1f s)", description, time.perf_counter() - start)
