"""The C heap of a long-lived process (glibc's malloc): give freed pages back, and keep arenas few.

Without glibc (musl, macOS) both are no-ops.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (malloc_trim), e.g. once a source's decoder is closed: the
    pages a closed decoder freed otherwise stay with the process, so a service whose cameras come and go grows for
    a long while before it levels off."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_arenas(count: int) -> bool:
    """Let the C heap use at most `count` malloc arenas (glibc's MALLOC_ARENA_MAX, set from inside the process);
    True when it took. glibc gives each new thread an arena of its own up to 8 per core, and the pages freed in one
    are not reused by the others: with decoding threads starting and ending as cameras come and go, memory spread
    over many arenas keeps growing after the live set stopped growing. Call it before the threads start."""
    if _LIBC is None:
        return False
    ok = bool(_LIBC.mallopt(M_ARENA_MAX, count))
    if not ok:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", count)
    return ok
