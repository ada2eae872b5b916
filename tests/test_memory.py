"""The C heap helpers a long-lived service uses (glibc only): few malloc arenas, free pages given back."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from graphflow.runtime import memory

pytestmark = pytest.mark.skipif(memory._LIBC is None, reason="needs glibc")

ARENAS = r"""
import ctypes, os, sys, tempfile, threading
import numpy
from graphflow.runtime.memory import limit_arenas, release_free_memory
if sys.argv[1] != "0":
    assert limit_arenas(int(sys.argv[1]))

def work():
    keep = [numpy.ones(20_000 + i) for i in range(40)]  # small enough to come from an arena, not mmap

threads = [threading.Thread(target=work) for _ in range(12)]
for t in threads:
    t.start()
for t in threads:
    t.join()
release_free_memory()
libc = ctypes.CDLL("libc.so.6")
libc.fdopen.restype = ctypes.c_void_p
with tempfile.TemporaryFile() as f:
    fp = libc.fdopen(os.dup(f.fileno()), b"w")
    libc.malloc_info(0, ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    f.seek(0)
    print(f.read().decode().count("<heap nr="))
"""


def heaps(limit: int) -> int:
    """Malloc arenas (glibc's malloc_info heaps) after 12 threads allocated, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}  # glibc's own default
    proc = subprocess.run([sys.executable, "-c", ARENAS, str(limit)], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


def test_limit_arenas_caps_the_arenas_threads_get_even_after_imports():
    """Without a limit twelve allocating threads get arenas of their own; with limit_arenas(2), called after numpy
    was imported (as the service does), they share two."""
    assert heaps(2) <= 2 < heaps(0)
