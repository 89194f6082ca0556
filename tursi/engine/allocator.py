"""Giving freed memory back to the system once a model is dropped.

A model's weights and its batch buffers are many large and small allocations. When they are
freed, glibc's malloc keeps much of that memory in its arenas for reuse instead of returning
it to the kernel, so an unloaded model left the worker's RSS hundreds of MB higher (issue 18;
figures in docs/reliability.md). `malloc_trim(0)` returns the free pages of every arena at
once. On CUDA, torch's caching allocator holds freed blocks the same way: `empty_cache()`.

Trimming alone left the worker growing (a freed block of a few MB is reused for smaller
blocks, and what is still in use pins the pages around it). glibc serves a block at least
M_MMAP_THRESHOLD big with its own mmap, which free() unmaps at once; but by default each such
free raises the threshold to the freed size (up to 32 MB), so a model's weights, once freed,
lift later tensors of their size into the arenas, and the trim threshold moves with it.
`tune()` fixes the mmap threshold at MMAP_THRESHOLD (mallopt, which also stops that
adjustment): 4 MiB. A step's activations (a 512-token prefill chunk's are 0.5-3 MB for the
embedded model) are reused from the arenas; the batch's KV buffers, a prefill group's cache
and the embedding are mapped on their own and go back to the system when freed; what a
model held in the arenas is handed back by the trim when it is dropped. At 128 KiB every
activation was a fresh mapping with fresh page faults (a 1,000-token prefill 2.5-2.7 s
against 1.74 s); at 32 MiB the KV buffers stay in the arenas (a burst of long requests under
a 40 MiB KV budget grew the worker by 272 MiB in a CI run; but by 297 MiB at 4 MiB in the
next one, against 130 MiB locally: not understood yet, docs/reliability.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys

MMAP_THRESHOLD = 4 * 2**20  # see above
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


@functools.cache
def _glibc():
    """glibc's malloc_trim and mallopt, or None (not Linux, or a libc without them: musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return trim, mallopt


def tune() -> None:
    """Fix glibc's mmap threshold (see above); a no-op without glibc. Call it once, early:
    blocks allocated before keep where they are."""
    glibc = _glibc()
    if glibc is not None:
        glibc[1](M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_memory() -> None:
    """Collect garbage (a model can sit in reference cycles), then hand the allocators' free
    memory back: glibc's arenas (malloc_trim), and torch's CUDA cache when CUDA is in use.
    Call it once the references to what was freed are gone; it costs tens of milliseconds
    (a full gc and a walk of the heap), so not per request."""
    gc.collect()
    glibc = _glibc()
    if glibc is not None:
        glibc[0](0)
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
