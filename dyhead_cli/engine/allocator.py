"""Keep freed memory for reuse in the ``dyhead`` process instead of handing it back to the OS (glibc).

Why: a detector's forward pass allocates and frees large tensors (columns, conv outputs, sample points)
many times per image. glibc serves large blocks with mmap and returns them at free, and trims the top of
its heap, so the next call's blocks are fresh pages: each first touch is a page fault, costly on virtual
machines (about 70 ms of a 1.1 s DyHead tower call on the project's 2-core VM, 8,000 faults). Asking
glibc to take blocks up to 32 MiB from its heap and to keep up to 1 GiB of freed memory makes repeated
calls reuse the same pages: the whole ATSS-R50-DyHead detector at 640x640 ran in 1.06 s instead of 1.15 s
(2 threads), the backbone gaining most. The cost: the process keeps its peak memory until it exits.

The ``dyhead`` command does this at start; ``DYHEAD_MALLOC=system`` leaves malloc as it is. Code that
imports dyhead in its own process can call ``keep_freed_memory()`` itself.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); True where that took effect,
    False on other C libraries and systems, or with ``DYHEAD_MALLOC=system``."""
    if os.environ.get("DYHEAD_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, glibc's among them
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
