"""Host memory: give freed memory back to the machine, for sessions with little of it (Binder, capped containers).

glibc keeps freed heap pages mapped and raises its mmap threshold as large blocks are freed, so a
training process's resident size stays at its peak and fragments upwards. Two calls fix that: a fixed
mmap threshold while training (each large activation gets its own mapping, unmapped when freed), and a
collect + trim between stages. On other C libraries (musl, macOS, Windows) both do nothing.
"""

from __future__ import annotations

import ctypes
import gc
import sys

from .probes import memory_limit

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20
SMALL_SESSION_BYTES = 4_000_000_000  # at or below this, training returns freed memory promptly


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, e.g. Alpine)
        return None


def return_freed_memory_in_small_sessions(threshold: int = MMAP_THRESHOLD) -> bool:
    """In a small session (`small_session`), serve blocks of `threshold` bytes and more with their own
    mmap, so freeing one unmaps it at once; elsewhere do nothing, since it only costs time there.

    glibc raises its mmap threshold as large blocks are freed (up to 32 MB), after which the
    activations of each training step come from the heap, whose freed space stays resident and
    fragments. Measured on the demo (5 steps of demo-cpu, gradient checkpointing on): training
    peaked at 2.02 GB RSS with glibc's default, 1.44 GB with a fixed 1 MiB threshold. It costs time:
    every large block is a fresh mapping whose pages fault in again. Under a 2 GB cgroup, 6 steps of
    demo-cpu took 61.0 s at 1 MiB (RSS peak 1.33 GB), 47.0 s at 4 MiB and 44.1 s at 16 MiB (both
    1.72 GB); uncapped, 6 steps took 57.8 s with the 1 MiB threshold and 46.0 s without. The setting
    holds for the rest of the process (glibc has one for all threads).

    Args:
        threshold: The block size, in bytes, from which blocks get their own mapping.

    Returns:
        Whether the threshold was set (a small session on glibc).
    """
    libc = _libc()
    if libc is None or not small_session():
        return False
    try:
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except AttributeError:
        return False


def small_session() -> bool:
    """Whether this session may use at most `SMALL_SESSION_BYTES` (Binder's 1-2 GB, a capped container)."""
    limit, _ = memory_limit()
    return limit is not None and limit <= SMALL_SESSION_BYTES


def release_memory() -> None:
    """Give freed memory back to the operating system: collect cycles, then trim glibc's heap.

    After training, the trainer, its optimizer and the step's activations are garbage, but Python's
    reference cycles keep some alive until a collection, and glibc keeps freed heap pages mapped, so
    the process's resident size stays at the training peak. Evaluation then adds on top of it.
    """
    gc.collect()
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:
            pass
