"""glibc malloc's thresholds for big blocks, set per process for how it uses a page's pixels.

A page's pixels are blocks of megabytes. By default glibc serves a block at least as large as
its mmap threshold with a mapping of its own, raises that threshold to the largest such block
freed so far (so later ones come from its heaps), and trims a heap's top once more than twice that
is free. Which costs what depends on the process: see the callers. Elsewhere (musl, macOS) nothing
is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def set_thresholds(*, mmap_bytes: int, trim_bytes: int | None = None) -> None:
    """Serve blocks of ``mmap_bytes`` or more with their own mappings (returned to the system when
    freed), and, with ``trim_bytes``, give back a heap's top only once that much is free. Either
    setting stops glibc from adjusting the other by itself."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)  # glibc only; a no-op answer elsewhere
        if trim_bytes is not None:
            libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)
