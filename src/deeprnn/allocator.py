"""Keep freed memory in the process: glibc malloc settings for training loops on CPU.

A training step on CPU allocates and frees the same large tensors every window: a scratch LSTM window
at the book's size saves ~8 MB of activations, ``nn.LSTM``'s oneDNN kernel its workspace. glibc's
malloc serves blocks of 128 KiB and more with ``mmap`` until its adaptive threshold has grown, and it
returns the top of the heap to the system once 128 KiB (later twice the threshold) are free there. Either
way the next window touches fresh pages, and the kernel faults and zeroes every 4 KiB of them: on the
2-core machine this project is measured on, a scratch LSTM window took ~2,400 page faults and its forward
pass ran at 125-210 µs per step instead of ~75 (``benchmarks/bench_allocator.py`` measures the whole
training step both ways).

``keep_freed_memory()`` sets two malloc parameters, as ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` would: blocks up to 32 MiB (glibc's largest allowed threshold) come from the
heap, and the heap is trimmed only when more than 512 MiB lie free at its top. The process then keeps up
to that much freed memory for reuse, the choice PyTorch's own GPU caching allocator and the jemalloc
settings Intel recommends for PyTorch on CPU make too. Peak memory does not grow.

It changes the whole process, so deeprnn calls it where it owns the process's work: ``deeprnn`` commands,
``deeprnn.train.train`` and the benchmark scripts. ``DEEPRNN_MALLOC=0`` leaves malloc alone. Elsewhere
than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

ENV = "DEEPRNN_MALLOC"
MMAP_THRESHOLD = 32 << 20  # glibc refuses more than HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit
TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


@functools.cache
def keep_freed_memory() -> str:
    """Set glibc malloc's mmap and trim thresholds once per process; returns what was done, in words."""
    return _apply()


def _apply() -> str:
    if os.environ.get(ENV) == "0":
        return f"malloc left alone ({ENV}=0)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "malloc left alone (not glibc)"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "malloc left alone (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "malloc left alone (mallopt refused)"
    return "glibc malloc keeps freed memory (mmap threshold 32 MiB, trim threshold 512 MiB)"
