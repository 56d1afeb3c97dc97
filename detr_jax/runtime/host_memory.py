"""Keep freed host memory in the process, so a step does not page its buffers in again.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with a
fresh `mmap` and gives it back to the kernel on `free`. XLA:CPU allocates a step's
activation and gradient buffers per execution, so on CPU every train step faults all of
their pages in again, zero-filled: ~270-400k minor page faults per DETR-R50 step at
2x512x512, about 0.3 s of it (scripts/bench_train_step_solo.py). With mmap disabled and
trimming effectively off, freed blocks stay in the heap and the next step reuses them.

The cost: the process keeps its peak heap until it exits (as PyTorch's caching allocators
do), and the first step is slower while the heap grows. The setting is process-wide and
only affects allocations made after it.

What XLA's compiler frees is kept too, in glibc's per-thread arenas where the step's
buffers do not fit; `release_freed_memory` gives it back, so training calls it once a
step is compiled and before it first runs (detr_jax.train.trainer.compile_step).
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: ~2 GiB of free top-of-heap before trimming


def _glibc():
    """glibc's libc (ctypes), or None where there is none (macOS, musl-based Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # glibc's own function


def retain_freed_memory() -> bool:
    """Tells glibc malloc to serve large blocks from the heap and keep freed ones.

    Returns True when the setting was applied, False where there is no glibc (macOS,
    musl-based Linux), which leaves the allocator as it was.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    if applied:
        log.info("glibc %s malloc: large blocks from the heap, freed memory kept",
                 libc.gnu_get_libc_version().decode())
    return applied


def release_freed_memory() -> bool:
    """Gives the free memory of every glibc malloc arena back to the kernel (`malloc_trim(0)`).

    Live allocations stay where they are; the next allocations fault fresh pages in. Returns
    False where there is no glibc (nothing done).
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim(0)
    return True
