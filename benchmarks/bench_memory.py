"""Memory: peak resident set size (RSS) of `make pretrain` and `make lora-finetune`.

A run measures its own peak and writes it as `peak_rss_mib` in its summary.json; running both here
would take many minutes, so this reads what they wrote. It also records the peak of this process.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

# name -> (summary file under the runs folder, the command that writes it)
RUNS = {"pretrain": ("pretrain/summary.json", "make pretrain"),
        "lora_finetune": ("lora/summary.json", "make lora-finetune")}


def peak_rss_mib() -> float:
    """Peak RSS of this process so far. ru_maxrss is in KiB on Linux and in bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def bench_memory(runs_dir: str | Path) -> dict:
    out = {}
    for name, (file, command) in RUNS.items():
        path = Path(runs_dir) / file
        if not path.is_file():
            out[name] = {"peak_rss_mib": None, "note": f"not measured: run {command} first"}
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("peak_rss_mib")
        except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
            value = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = {"peak_rss_mib": float(value), "source": str(path)}
        else:  # a run from before summaries recorded it
            out[name] = {"peak_rss_mib": None, "note": f"not measured: {path} has no peak_rss_mib; run {command} "
                                                       "again (ARGS=--overwrite)"}
    out["this_benchmark"] = {"peak_rss_mib": peak_rss_mib()}
    return out
