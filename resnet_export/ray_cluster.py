"""The Ray a command runs on: a cluster of its own (``local``, shut down at the end), one already running (``auto``,
``ray://HOST:PORT``), or the one this process already joined (left running)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from .data import DataError


@contextlib.contextmanager
def ray_data(address: str) -> Iterator[object]:
    """Ray joined or started at ``address`` with Ray Data set for ordered, quiet runs; yields the ``ray`` module.
    A Ray started here is shut down at the end."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise DataError(f"`ray` needs Ray Data, which is not installed ({exc}): pip install 'ray[data]'") from exc
    started = not ray.is_initialized()
    if started:
        # "local" starts a cluster of its own; Ray's default (None) would join the last `ray start` on this machine
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # results in the files' order, as the local run makes them
        yield ray
    finally:
        if started:
            ray.shutdown()
