"""Measurement helpers shared by the benchmarks: interleaved timing and peak resident memory of one call."""

from __future__ import annotations

import gc
import re
import statistics
import time
from collections.abc import Callable


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{key}:\s+(\d+) kB", handle.read()).group(1)) * 1024


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak resident memory (bytes) that `fn` adds on top of what the process held before it.

    Linux's high-water mark (VmHWM) is reset through /proc/self/clear_refs, so several measurements can run in
    one process. Large tensors are mmapped by the allocator and returned on free, so the mark follows them."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each function, alternating between them so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
