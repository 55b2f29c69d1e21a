"""glibc ``malloc`` settings that stop the allocator from returning training buffers to the OS.

A training step allocates and frees the same large buffers (logit chunks, dropout masks,
activations) every step. By default glibc serves blocks above a dynamic threshold with fresh
``mmap`` pages and trims the heap eagerly, so every step page-faults those buffers in again: on
the project's 2-core CPU a 524 x 8000 ``log_softmax`` took 10 ms instead of 1.8 ms
(``benchmarks/results/throughput_*`` compares whole steps).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold`` free.

    Costs a higher resident size (freed memory stays with the process) for fewer page faults.
    Does nothing, and returns ``False``, off glibc or when ``GLIBC_TUNABLES`` already sets malloc
    options (the user's choice wins). Returns ``True`` once applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
