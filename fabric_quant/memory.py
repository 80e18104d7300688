"""Host memory: give freed heap memory back to the operating system (glibc on Linux; elsewhere these do nothing).

glibc serves allocations above its mmap threshold with their own mappings, returned to the system on free, and the
rest from heap arenas that keep freed blocks for reuse. The threshold grows with every large free (up to 32 MiB by
default), so after a model load or a training step most temporaries of a few MiB land in the arenas and the process
keeps holding their high-water mark, fragmented. Measured here on a QLoRA step of a Llama-3.2-1B shape (CPU, gradient
checkpointing; docs/benchmarks.md), fixing the threshold lowered the run's peak RSS by about a quarter.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def _libc():
    if platform.system() != "Linux":
        return None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # not glibc (musl)
    return None


def release_freed_memory() -> None:
    """Hand the heap memory freed so far (e.g. one float tensor after another during a load) back to the system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


LARGE_CHECKPOINT = 1 << 30  # bytes: from here on memory, below it step time decides the threshold


def mmap_threshold_for(checkpoint_bytes: int) -> int:
    """The mmap threshold for training a model whose checkpoint holds ``checkpoint_bytes``.

    256 KiB from 1 GiB on: on a 1B QLoRA step (gradient checkpointing; one run each) the peak over imports was
    1720 MB with it against 2155 MB with 4 MiB, the heap's fragmentation being most of the difference. 4 MiB below:
    every allocation above the threshold is a fresh mapping whose pages are zeroed on first touch, and with 256 KiB
    a MiniLM step (activations of a few hundred KiB) took 1.6x as long as without the fix; with 4 MiB, as long
    (docs/benchmarks.md)."""
    return 256 * 1024 if checkpoint_bytes >= LARGE_CHECKPOINT else 4 * 1024 * 1024


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of ``nbytes`` or more by its own mapping, freed at once, for the rest of the process
    (it also stops the threshold from growing). Returns whether it took effect (glibc only)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
