"""How every benchmark measures: contenders side by side, warm-up, median and spread, targets.

A timing on a laptop (or a shared 2-core VM) drifts: another process wakes up, the clock changes. Two
contenders timed one after the other can differ by 20% for that reason alone. So the contenders take
turns (A, B, A, B, ...) inside one process, and every figure is quoted as a ratio beside its absolute
values. The ratio is taken round by round (microlm.evaluate.paired_ratio): a drift slows both
contenders of a round alike and cancels in that round's ratio, and the spread of the rounds' ratios
says how far to trust the median one.
"""

from __future__ import annotations

import operator
import os
import platform
import time
from datetime import datetime, timezone
from typing import Callable

import torch

from microlm.evaluate import paired_ratio, timing_stats
from microlm.runs import provenance

__all__ = ["machine", "paired_ratio", "side_by_side", "target", "timing_stats"]


def side_by_side(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Call each contender `repeats` times, taking turns, after `warmup` untimed rounds (the first call
    pays for allocations and lazy initialisation). Seconds per call: timing_stats per contender."""
    for _ in range(warmup):
        for run in contenders.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: timing_stats(ts) for name, ts in times.items()}


def target(value: float, op: str, threshold: float, shown: str = "") -> dict:
    """A target from the issue, checked: benchmarks report it as met or not, they never fail on it.
    `shown` is how the table writes it; by default a ratio, e.g. '>= 10x'."""
    return {"value": value, "target": shown or f"{op} {threshold:g}x", "met": bool(_OPS[op](value, threshold))}


_OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


def machine() -> dict:
    """What the numbers were measured on. The load average matters on a shared machine: a figure
    taken at load 2 on 2 cores is about half of what an idle machine gives."""
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:  # not Linux
        pass
    info = provenance(seed=0)  # git commit and package versions, as every run folder records them
    return {"cpu": cpu or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": info["git_commit"], "tiktoken": info["tiktoken"],
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
