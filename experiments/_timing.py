"""Interleaved wall-time rounds shared by the benchmarks that compare several step functions.

Each runner runs once to warm up (JAX compiles; torch fills its allocator and autograd caches), then
``steps`` rounds run every runner once each, in order, so that load changes hit all of them alike.
Report ratios of the medians from one run, with the load average before and after.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def interleaved(runners: Mapping[str, Callable[[], Any]], steps: int) -> dict[str, Any]:
    """``{"median": {name: s}, "walls": {name: [s, ...]}, "cpu_median": {name: s}, "cpus": {...}, "load_before": (...),
    "load_after": (...)}``.

    Each runner must block until its result is ready (``jax.block_until_ready``). Wall time is
    ``perf_counter``; CPU time is the process's (``process_time``, all threads), which other jobs'
    load inflates less than the wall time (threads that spin while they wait still count).

    >>> out = interleaved({"a": lambda: sum(range(10)), "b": lambda: None}, steps=3)
    >>> sorted(out["median"]), len(out["walls"]["a"]), len(out["load_before"])
    (['a', 'b'], 3, 3)
    """
    for fn in runners.values():
        fn()
    walls: dict[str, list[float]] = {k: [] for k in runners}
    cpus: dict[str, list[float]] = {k: [] for k in runners}
    load_before = os.getloadavg()
    for _ in range(steps):
        for k, fn in runners.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            walls[k].append(time.perf_counter() - t)
            cpus[k].append(time.process_time() - c)
    load_after = os.getloadavg()
    median = {k: statistics.median(v) for k, v in walls.items()}
    cpu_median = {k: statistics.median(v) for k, v in cpus.items()}
    return {
        "median": median,
        "walls": walls,
        "cpu_median": cpu_median,
        "cpus": cpus,
        "load_before": load_before,
        "load_after": load_after,
    }
