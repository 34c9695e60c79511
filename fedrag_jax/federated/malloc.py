"""Keep large freed buffers for reuse in processes that move parameters every round.

Every round a server and a client build and drop payloads of the same sizes (the query
tower: ~87 MB of Python bytes each way, the replies' copies, the average). glibc's malloc
serves a block of more than ~32 MB (less before its dynamic threshold rises) with a fresh
``mmap`` and returns it with ``munmap`` on free, so every round pays a page fault and a
kernel zeroing for each 4 KiB of it again: on the MiniLM query tower, joining the 45 MB
word-embedding payload took ~24 ms, ~4 ms of it the copy itself. With the thresholds raised
(``mallopt``), such blocks come from the heap and, once freed, stay there for the next
round. The cost: the process keeps up to ``KEEP_BYTES`` of freed memory instead of giving
it back to the OS.

Only glibc has ``mallopt``; elsewhere (macOS, musl) this does nothing. Set
``FEDRAG_JAX_MALLOC=default`` to leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

KEEP_BYTES = 1 << 30  # blocks up to 1 GiB from the heap; up to 1 GiB of freed heap kept
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_tuned: bool | None = None  # None: not tried yet in this process


def reuse_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds to ``KEEP_BYTES`` for this process (once; a
    forked child inherits it). True if the allocator is tuned."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("FEDRAG_JAX_MALLOC", "").lower() == "default":
        return _tuned
    if not sys.platform.startswith("linux"):
        return _tuned
    try:  # the process's own symbols: libc's, without looking for the library (a subprocess)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return _tuned
    # mallopt returns 1 on success; musl's stub returns 0
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) \
        and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
    log.debug("malloc thresholds raised to %d bytes: %s", KEEP_BYTES, _tuned)
    return _tuned
