# Copyright 2026 The dtop-hf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The C allocator under CPU timings: one regime, whatever ran before.

PyTorch's CPU tensors come from `malloc`. glibc serves a block of at least its *mmap threshold* with a fresh
`mmap`, and hands the free top of its heap back to the system once it exceeds the *trim threshold*. They start at
128 and 256 KiB; each mapped block freed raises the first to its size (up to 32 MiB) and the second to twice that.
So the same forward pass runs in one of two regimes, depending on the process's past:

- fresh process, small model: every forward frees its activations, the heap top is trimmed, and the next forward
  takes its memory back page by page (the quick-start model at batch 8: thousands of page faults and about a sixth of
  its time per forward);
- after a larger model ran (as in a suite that starts with ViT-B/16): the thresholds are high, the heap keeps its
  pages, no page faults.

Page faults scale with the memory a forward allocates, that is with its tokens, so the first regime flatters
speed-up / R at small sizes (by several percent at the quick-start size) while every call is slower. The
benchmark pins the second regime before timing, so that a run's numbers do not depend on which runs came first;
`--no_steady_allocator` leaves glibc's own rule. Users get the same regime from the environment
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`; see `docs/inference.md`).
"""

import ctypes
import os


# glibc's largest mmap threshold (half its 64 MiB heap size): blocks up to this size come from the heap.
MMAP_THRESHOLD_BYTES = 32 * 2**20
# Free memory the heap keeps at its top: twice the mmap threshold, as glibc's own rule sets it.
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
# `mallopt` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# The regime of this process, as `steady_allocator` last set it (the allocator's settings are process-wide).
_pinned_regime: dict | None = None


def glibc_version() -> str | None:
    """`"glibc 2.36"` when this process runs on glibc, else `None` (musl, macOS, Windows)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the one whose `mallopt` and `malloc_trim` this module knows), else `None`."""
    return ctypes.CDLL("libc.so.6") if glibc_version() else None


def steady_allocator() -> dict:
    """Pin glibc's mmap and trim thresholds (see the module docstring) for the rest of the process; returns the
    regime (see `allocator_regime`). Nothing changes on another C library or when glibc refuses a value."""
    global _pinned_regime
    libc = glibc()
    pinned = (
        libc is not None
        and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if pinned:
        _pinned_regime = {
            "cpu_allocator": f"{glibc_version()}, thresholds pinned",
            "malloc_mmap_threshold_bytes": MMAP_THRESHOLD_BYTES,
            "malloc_trim_threshold_bytes": TRIM_THRESHOLD_BYTES,
        }
    return allocator_regime()


def allocator_regime() -> dict:
    """The C allocator's regime, for a benchmark record: pinned thresholds, or the C library's own rule."""
    if _pinned_regime is not None:
        return dict(_pinned_regime)
    version = glibc_version()
    return {"cpu_allocator": f"{version}, dynamic thresholds" if version else "not glibc, its own rule"}


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`), so that a later resident-memory
    reading sees a forward's growth instead of reused pages; nothing on another C library."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
