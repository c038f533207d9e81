"""What the speed benchmarks share: warm timing of a call and the CPU's name."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable


def warm_times(fn: Callable[[], Any], runs: int) -> tuple[float, list[float], Any]:
    """(median seconds, every run's seconds, the last result) of ``runs`` calls of ``fn`` after one warm-up call."""
    fn()
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def cpu_name() -> str:
    """The CPU model, its core count, and whether it has AVX512-BF16 (what bf16 autocast needs)."""
    try:
        flags = open("/proc/cpuinfo").read()
        model = next(line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name"))
        return f"{model}, {os.cpu_count()} cores, avx512_bf16: {'avx512_bf16' in flags}"
    except (OSError, StopIteration):
        return "unknown"
