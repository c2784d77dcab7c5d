"""Measurement helpers shared by the benchmarks: interleaved timing, peak resident memory of one call, and a profile
of one call (its operators or kernels, and on a GPU how busy the device was)."""

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


#: Operators that only make views or read metadata: no kernel runs for them on a GPU.
VIEW_OPERATORS = frozenset(
    "alias as_strided chunk detach expand lift_fresh narrow permute reshape _reshape_alias select slice split "
    "split_with_sizes squeeze t transpose unbind unsqueeze view _unsafe_view".split()
)


def count_operators(fn: Callable[[], object]) -> int:
    """How many ATen operators that do work (views left out) one call of ``fn`` dispatches: each is a kernel launch
    on a GPU (a custom operator's own kernels, such as Triton's, count once), so on a CPU this stands in for the
    launch count a launch-bound GPU pays for."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEW_OPERATORS:
                self.count += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        fn()
    return counter.count


def profile_call(fn: Callable[[], object], label: str, device, rows: int, tag: str) -> dict[str, float]:
    """Run ``fn`` once under ``torch.profiler`` and print its ``rows`` most expensive operators (kernels on a GPU,
    by device time), how many kernels it launched and the share of its wall time the device was busy: a low share
    means the device waits on launches or on the host, a high one on its kernels. ``fn`` must leave the device
    synchronized. Prints ``RESULT <tag>_kernels`` and ``<tag>_device_busy_share`` on a GPU, ``<tag>_operators`` on a
    CPU (:func:`count_operators` on one more call), and returns the same numbers."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = getattr(device, "type", str(device)) == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    print(f"\n{label}: {wall * 1000:.1f} ms profiled")
    print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows))
    if cuda:
        kernels = [
            e
            for e in events
            if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA
        ]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        launches = sum(e.count for e in kernels)
        print(f"{label}: {launches} kernels, the device busy {busy * 1000:.1f} ms of {wall * 1000:.1f} ms")
        print(f"RESULT {tag}_kernels {launches}")
        print(f"RESULT {tag}_device_busy_share {busy / wall:.3f}")
        return {"kernels": launches, "device_busy_share": busy / wall}
    operators = count_operators(fn)
    print(f"{label}: {operators} operators that launch work (views left out), counted on one more call")
    print(f"RESULT {tag}_operators {operators}")
    return {"operators": operators}
