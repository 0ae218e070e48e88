"""Keeping freed activation memory in the heap of a CPU encode process (glibc malloc).

Every decoder layer frees its large buffers and allocates them again for the next layer (the MLP's
(T, intermediate) ones: 4 MiB per 1,024 fp32 tokens of the small benchmark model, hundreds of MiB for
a 7B model). glibc serves buffers above its mmap threshold with fresh mappings and returns the top of
the heap to the system beyond its trim threshold, so the next layer page-faults the same memory in
again, zero-filled by the kernel. On the small CPU encode benchmark (2-core Xeon, one thread) that was
~230,000 page faults per call; with both thresholds raised, ~300, and the call ran 3.39 s instead of
3.69 s.

:func:`retain_freed_memory` raises them with ``mallopt``: buffers up to 32 MiB (glibc's largest mmap
threshold) come from the heap, and up to 256 MiB of freed memory stays at its top. That holds for the
whole process, so only processes this package owns call it: ``llm2vec-fast encode`` on a CPU device,
and the CPU workers of an encode pool. ``LLM2Vec.encode`` in your own process leaves your allocator
alone; call the function yourself for the same effect. ``LLM2VEC_FAST_RETAIN_HEAP=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "LLM2VEC_FAST_RETAIN_HEAP"
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring). Returns
    whether both were set: False off glibc, or when ``LLM2VEC_FAST_RETAIN_HEAP=0``."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first, since setting either one fixes both
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
