"""A build's timing-cache save, run in spawned processes by the lock test (tests/engine/test_trt.py).

It lives apart from the test module so that each child imports only ``resnet_export.trt`` (0.1 s), not the test
module with torch (2 s)."""

import time

from resnet_export.engine.build import merge_timing_cache


def save_entry(path: str, entry: str, ready) -> None:
    """One build saving its timing cache: the merge reads what is on disk, takes a while, adds its entry."""
    def merge(saved: bytes) -> bytes:
        time.sleep(0.5)  # both builds are inside their save at once unless the lock orders them
        return b"".join(sorted(set(saved.splitlines(keepends=True)) | {entry.encode() + b"\n"}))

    ready.wait()  # both processes have imported everything: they start saving together
    merge_timing_cache(path, merge)
