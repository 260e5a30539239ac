"""Keep freed tensor memory for reuse instead of handing it back to the OS (glibc's malloc, Linux).

PyTorch's CPU tensors come from the C library's malloc. glibc serves big blocks with fresh pages
from the kernel and returns memory at the top of its heap whenever enough of it is free. A training
step allocates and frees the same few-MB activations every step, so it keeps getting fresh pages,
and each 4 KiB page costs a page fault and zero-filling on first touch: at the default config a
training step of microlm's GPT took 8,500 to 11,800 page faults (the GPT-2-style baseline in
benchmarks/, whose allocations happen to suit glibc's heuristics: none). Two settings stop the churn:
blocks under 32 MiB come from the heap, and the heap is not trimmed, so a step reuses the last step's
pages: 1 or 2 faults a step, and a step about 3% faster (results/HISTORY.md, "Speed work in earlier versions"). The peak is reached
either way, so peak memory barely changes; what changes is that it is not returned until the process ends.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above, for this process. Returns whether it applied (False elsewhere:
    macOS, Windows, or a C library without mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; musl's stub returns 0, and nothing changes
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
